"""--mode=duplicates: calibrate a duplicate threshold on labelled pairs, then cluster a
catalog with it (docs/retrieval.md, "Duplicate detection").

    run_duplicates(config, workdir, catalog, image_dir, out_dir, *, pairs=None,
                   checkpoint=None, step=None, data_dir=None) -> report dict

1. Restore the trained model (as export and search do) and embed the catalog in the
   `duplicates.view` modality.
2. Labelled pairs: `pairs` (a release-format CSV whose `label` is 1 for a duplicate,
   0 for not; ids from the catalog), else the demo world's truth (`style_id`): every
   same-style pair of the held-out (eval-split) styles is a positive, and each such
   listing's `top_k` nearest listings of another style are the negatives (the hard
   candidates clustering will see). The demo world never lists a style twice at one
   supplier, so there a positive is the same product at two suppliers.
3. Calibrate (duplicates.py): the smallest cosine with precision >= target_precision.
4. Cluster the whole catalog at that threshold (duplicates_clusters.py), per supplier or
   across suppliers; with style ids, the clusters' pair precision/recall against them.
5. Write out_dir/{report.json, thresholds.md, pr_curve.png, clusters.jsonl}, each
   atomically. When no threshold reaches the target, none is invented: report.json
   says so, clusters.jsonl is empty.
"""
import csv
import io
import json
import math
import pathlib
import time

import numpy as np

from esspr_jax import atomic_io
from esspr_jax import workdir as workdir_lib
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.ingest import release_format
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.input import tokenizer_stage
from esspr_jax.retrieval import duplicates as dup
from esspr_jax.retrieval import duplicates_clusters as dc
from esspr_jax.retrieval import export as export_lib
from esspr_jax.retrieval import report as report_lib
from esspr_jax.retrieval import restore

OUTPUTS = ("report.json", "thresholds.md", "pr_curve.png", "clusters.jsonl")
FLOAT32_SLACK = 1e-6
CURVE_POINTS = 200   # points of the sweep kept in report.json (the plot uses all)


# ----------------------------------------------------------------------------- pairs
def pair_scores(vectors: np.ndarray, a, b) -> np.ndarray:
  """Cosine of unit vectors, in float64."""
  v = np.asarray(vectors, np.float64)
  return np.einsum("nd,nd->n", v[np.asarray(a)], v[np.asarray(b)])


def truth_pairs(vectors: np.ndarray, styles, top_k: int, rows=None) -> tuple:
  """(a, b, labels) over catalog rows from known styles (see module doc, step 2):
  all same-style pairs among `rows`, and the other-style pairs among each row's top_k
  neighbours within `rows`. Memory: the pairs and [rows, top_k] neighbour lists."""
  styles = np.asarray(styles, dtype=object)
  rows = np.flatnonzero(styles != "") if rows is None else np.asarray(rows, np.int64)
  if len(rows) < 2:
    raise DataError(f"duplicates: {len(rows)} listings with a known style; labelled pairs "
                    "need at least 2 (give --pairs=CSV with a label column instead)")
  st = styles[rows]
  order = np.argsort(st, kind="stable")
  _, starts = np.unique(st[order], return_index=True)
  pos = [(rows[g[i]], rows[g[j]]) for g in np.split(order, starts[1:])
         for i in range(len(g)) for j in range(i + 1, len(g))]
  cand = dc.edges(np.asarray(vectors)[rows], -2.0, top_k)   # every top_k neighbour
  other = st[cand.a] != st[cand.b]
  neg = list(zip(rows[cand.a[other]].tolist(), rows[cand.b[other]].tolist()))
  pairs = [(min(x, y), max(x, y), 1) for x, y in pos] + [(x, y, 0) for x, y in neg]
  arr = np.asarray(pairs, np.int64).reshape(-1, 3)
  return arr[:, 0], arr[:, 1], arr[:, 2]


def csv_pairs(path, row_of: dict, skips: SkipCounter | None = None) -> tuple:
  """(a, b, labels) from a release-format pairs CSV (ingest/release_format.py reads it);
  an id missing from the catalog is an error naming it. Rows it skips (a label other
  than 0 or 1, ...) are counted in `skips`, which the report shows."""
  a, b, y, missing = [], [], [], []
  for row in release_format.read_pairs(path, skips):
    for listing in (row.trigger_id, row.recall_id):
      if listing not in row_of:
        missing.append(f"{listing} (line {row.source_row})")
    if row.trigger_id in row_of and row.recall_id in row_of:
      a.append(row_of[row.trigger_id]), b.append(row_of[row.recall_id]), y.append(row.label)
  if missing:
    raise DataError(f"{path}: {len(missing)} pair ids are not in the catalog, e.g. "
                    f"{missing[:3]}")
  if not y:
    raise DataError(f"{path}: no labelled pairs")
  return np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(y, np.int64)


def eval_style_rows(catalog_csv, styles) -> np.ndarray | None:
  """Rows of the held-out styles when styles.csv (the demo world's) lies beside the
  catalog: the model never trained on them. None without it (then every style counts)."""
  path = pathlib.Path(catalog_csv).parent / "styles.csv"
  if not path.is_file():
    return None
  with open(path, newline="", encoding="utf-8") as f:
    held_out = {r["style_id"] for r in csv.DictReader(f) if r.get("split") == "eval"}
  return np.flatnonzero(np.isin(np.asarray(styles, dtype=object), list(held_out)))


# ----------------------------------------------------------------------------- clusters
def _pairs_in(sizes) -> int:
  return int(sum(n * (n - 1) // 2 for n in sizes))


def cluster_quality(clusters, styles, groups=None) -> dict:
  """Pair precision / recall of the clusters against known styles (within the scope)."""
  styles = np.asarray(styles, dtype=object)
  key = styles if groups is None else np.char.add(np.asarray(styles, str),
                                                 np.char.add("\x00", np.asarray(groups, str)))
  known = styles != ""
  true_pairs = _pairs_in(np.unique(key[known], return_counts=True)[1])
  inside = _pairs_in(len(c.rows) for c in clusters)
  same = sum(_pairs_in(np.unique(key[c.rows][known[c.rows]], return_counts=True)[1])
             for c in clusters)
  return {"pairs_in_clusters": inside, "same_style_pairs_in_clusters": same,
          "same_style_pairs_in_scope": true_pairs,
          "pair_precision": same / inside if inside else None,
          "pair_recall": same / true_pairs if true_pairs else None}


# ----------------------------------------------------------------------------- outputs
def grid_points(sw: dup.Sweep) -> list[dup.Point]:
  """The operating points at round thresholds across the scores' range (steps of 0.05,
  finer where the scores span less, so the table has a few rows)."""
  span = sw.thresholds[0] - sw.thresholds[-1]
  step = next((s for s in (0.05, 0.01, 0.001) if span >= 4 * s), 0.0001)
  lo, hi = math.floor(sw.thresholds[-1] / step) * step, sw.thresholds[0]
  grid = [round(lo + i * step, 4) for i in range(int(round((hi - lo) / step, 6)) + 1)]
  out = []
  for t in grid:
    j = np.searchsorted(-sw.thresholds, -t, side="right") - 1   # last threshold >= t
    tp, fp = (int(sw.tp[j]), int(sw.fp[j])) if j >= 0 else (0, 0)
    out.append(dup.Point(t, tp, fp, sw.positives))
  return out


def _fmt(x) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def thresholds_table(points, marks: dict) -> str:
  """Markdown: one row per threshold; `marks` {threshold: note} labels special rows."""
  lines = ["| threshold | precision | recall | F1 | called | TP | FP | note |",
           "|---|---|---|---|---|---|---|---|"]
  for p in sorted({p.threshold: p for p in points}.values(), key=lambda p: -p.threshold):
    lines.append(f"| {p.threshold:.4f} | {_fmt(p.precision)} | {p.recall:.4f} | {p.f1:.4f} | "
                 f"{p.tp + p.fp} | {p.tp} | {p.fp} | {marks.get(p.threshold, '')} |")
  return "\n".join(lines) + "\n"


def plot_png(sw: dup.Sweep, cal: dup.Calibration, title: str) -> bytes:
  """Precision / recall / F1 against the threshold, and the PR curve (PNG bytes)."""
  plt = report_lib.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
  for values, name in ((sw.precision, "precision"), (sw.recall, "recall"), (sw.f1, "F1")):
    left.plot(sw.thresholds, values, label=name, drawstyle="steps-post")
  left.axhline(cal.target_precision, color="grey", linestyle=":", label="target precision")
  right.plot(sw.recall, sw.precision, drawstyle="steps-post")
  right.axhline(cal.target_precision, color="grey", linestyle=":")
  if cal.reached:
    left.axvline(cal.threshold, color="black", linestyle="--",
                 label=f"calibrated {cal.threshold:.3f}")
    right.plot([cal.point.recall], [cal.point.precision], "ko")
  left.set_xlabel("cosine threshold")
  left.legend(fontsize=8)
  right.set_xlabel("recall")
  right.set_ylabel("precision")
  for ax in (left, right):
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  return png.getvalue()


def curve(sw: dup.Sweep) -> list[dict]:
  """At most CURVE_POINTS points of the sweep, evenly spaced, ends included."""
  idx = np.unique(np.linspace(0, len(sw.thresholds) - 1, CURVE_POINTS).round().astype(int))
  return [sw.point(int(j)).as_dict() for j in idx]


def cluster_records(clusters, ids, suppliers) -> str:
  return "".join(json.dumps({
      "cluster": n, "size": len(c.rows), "listing_ids": [str(ids[r]) for r in c.rows],
      "supplier_ids": [str(suppliers[r]) for r in c.rows], "edges": c.edges,
      "min_score": round(c.min_score, 6), "max_score": round(c.max_score, 6)}) + "\n"
      for n, c in enumerate(clusters))


def summary_lines(report: dict) -> list[str]:
  """The console lines of the mode (stages.duplicates prints them)."""
  p, cal = report["pairs"], report["calibration"]
  skipped = p.get("skipped") or {}
  lines = [f"[duplicates] {p['count']} labelled pairs ({p['positives']} duplicates) from "
           f"{p['source']}, view {report['view']}"
           + (f"; {sum(skipped.values())} rows skipped ({skipped})" if skipped else "")]
  if cal["reached"]:
    at = cal["at_threshold"]
    lines.append(f"[duplicates] threshold {cal['threshold']:.4f}: precision "
                 f"{at['precision']:.4f} >= {cal['target_precision']}, recall {at['recall']:.4f}, "
                 f"F1 {at['f1']:.4f}")
    c = report["clusters"]
    lines.append(f"[duplicates] {c['count']} clusters ({c['listings']} listings, scope "
                 f"{c['scope']}) -> {report['out_dir']} in {report['seconds']:.1f}s")
  else:
    lines.append(f"[duplicates] {cal['message']}; no clusters -> {report['out_dir']}")
  return lines


# ----------------------------------------------------------------------------- the mode
def run_duplicates(config, workdir, catalog, image_dir, out_dir, *, pairs=None,
                   checkpoint=None, step=None, data_dir=None) -> dict:
  """See module doc."""
  start = time.perf_counter()
  d = config.duplicates
  model, params, info = restore.load_model_and_params(config, checkpoint or workdir, step=step)
  if d.view not in getattr(model, "available", (d.view,)):
    raise ConfigError("duplicates.view", f"{d.view!r}: this model produces only "
                      f"{tuple(model.available)}")
  if data_dir is None:
    data_dir = workdir_lib.default_data_dir(config, workdir)
  tokenizer = tokenizer_stage.load_tokenizer(config, data_dir)
  items, listings = export_lib.read_catalog(config, catalog, image_dir)
  if len(items) == 0:
    raise DataError(f"duplicates: the catalog {catalog} holds no usable listing")
  ids, vectors = export_lib.embed_items(model, params, items, config, tokenizer=tokenizer,
                                        modalities=(d.view,))
  vectors = np.asarray(vectors[d.view], np.float32)
  ids = np.asarray(ids).astype(str)
  rows = [listings.get(i) for i in ids]
  suppliers = np.asarray([getattr(x, "supplier_id", "") for x in rows], dtype=object)
  styles = np.asarray([getattr(x, "style_id", "") for x in rows], dtype=object)

  skips = SkipCounter(f"duplicates: pairs {pairs}")
  if pairs:
    a, b, y = csv_pairs(pairs, {i: r for r, i in enumerate(ids)}, skips)
    source = str(pairs)
  elif (styles != "").any():
    a, b, y = truth_pairs(vectors, styles, d.top_k, eval_style_rows(catalog, styles))
    source = "the demo world's styles (held-out styles; top_k negatives)"
  else:
    raise DataError(f"duplicates: no labelled pairs: {catalog} has no style ids (the "
                    "demo world's truth); give --pairs=CSV (release format, label 1/0)")
  scores = pair_scores(vectors, a, b)
  sw = dup.sweep(scores, y)
  cal = dup.calibrate(scores, y, d.target_precision)
  groups = suppliers if d.scope == "supplier" else None
  clusters = []
  if cal.reached:
    # Less FLOAT32_SLACK: the index scores in float32, so a calibration pair scored
    # exactly at the threshold (in float64) must not drop out by rounding.
    clusters = dc.cluster_catalog(vectors, cal.threshold - FLOAT32_SLACK, d.top_k, groups=groups,
                                  index_config=config.eval.index)
  cluster_info = {"count": len(clusters), "listings": int(sum(len(c.rows) for c in clusters)),
                  "scope": d.scope, "top_k": d.top_k, "threshold": cal.threshold,
                  "catalog": str(catalog), "catalog_listings": len(ids)}
  if cal.reached and (styles != "").any():
    cluster_info["against_styles"] = cluster_quality(clusters, styles, groups)

  out_dir = pathlib.Path(out_dir) if not atomic_io.is_remote(out_dir) else out_dir
  best = sw.best_f1()
  marks = {best.threshold: "best F1"}
  if cal.reached:
    note = f"calibrated (precision >= {d.target_precision})"
    marks[cal.threshold] = f"{note}, {marks[cal.threshold]}" if cal.threshold in marks else note
  table = list({p.threshold: p for p in
                grid_points(sw) + [best] + ([cal.point] if cal.reached else [])}.values())
  table.sort(key=lambda p: -p.threshold)
  report = {
      "view": d.view, "target_precision": d.target_precision,
      "pairs": {"source": source, "count": int(len(y)), "positives": sw.positives,
                "negatives": sw.negatives, "skipped": dict(skips.reasons)},
      "calibration": cal.as_dict(), "best_f1": best.as_dict(),
      "table": [p.as_dict() for p in table], "curve": curve(sw), "clusters": cluster_info,
      "checkpoint": info.get("checkpoint"), "step": info.get("step"),
      "out_dir": str(out_dir), "seconds": time.perf_counter() - start,
  }
  title = f"duplicates, view {d.view}: {sw.positives} + {sw.negatives} labelled pairs"
  atomic_io.atomic_write(f"{out_dir}/pr_curve.png", plot_png(sw, cal, title))
  atomic_io.atomic_write(f"{out_dir}/thresholds.md", f"# {title}\n\n{cal.message}.\n\n"
                         + thresholds_table(table, marks))
  atomic_io.atomic_write(f"{out_dir}/clusters.jsonl", cluster_records(clusters, ids, suppliers))
  atomic_io.write_json(f"{out_dir}/report.json", report)   # last: its presence means done
  return report
