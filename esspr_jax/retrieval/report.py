"""Writers for what people read: the eval table (console, Markdown, JSON, TensorBoard,
a Recall@K plot) and the HTML page of search results. Every file is written atomically
(atomic_io: temp file + rename locally, one whole-object upload on gs://), so a reader
never sees half of one. Output dirs may be local paths or gs:// URLs."""
import html
import io
import json
import math
import re
from typing import Sequence

from etils import epath

from esspr_jax.atomic_io import atomic_write  # noqa: F401 - callers import it from here
from esspr_jax.event_files import TensorBoard
from esspr_jax.retrieval.scoring import SettingResult


def _search_note(retrieval: dict) -> str:
  if retrieval.get("kind") == "scann":
    s = retrieval["scann"]
    return (f"ScaNN (recall@{s['tune_k']} vs exact {retrieval['recall']:.4f}, "
            f"leaves {s['leaves_to_search']}/{s['num_leaves']}, reorder {s['reorder']})")
  return "exact"


def markdown_table(results: Sequence[SettingResult], ks: Sequence[int]) -> str:
  """The paper's table: one row per setting x-y, MRR and Recall@K, and how it was searched."""
  head = "| setting | MRR | " + " | ".join(f"R@{k}" for k in ks) + " | queries | search |"
  rule = "|---" * (len(ks) + 4) + "|"
  rows = [head, rule]
  for r in results:
    m = r.metrics
    rows.append(f"| {r.setting} | {m['mrr']:.4f} | "
                + " | ".join(f"{m[f'recall@{k}']:.4f}" for k in ks)
                + f" | {m['queries']} | {_search_note(r.retrieval)} |")
  return "\n".join(rows) + "\n"


def scalars(results: Sequence[SettingResult]) -> dict[str, float]:
  """Flat {'m-m/mrr': ..., 'm-m/recall_at_20': ...} for metric writers (TensorBoard
  tag characters only, so 'recall@20' becomes 'recall_at_20')."""
  out = {}
  for r in results:
    for key, value in r.metrics.items():
      if key != "queries":
        out[f"{r.setting}/{key.replace('@', '_at_')}"] = float(value)
  return out


def results_json(results: Sequence[SettingResult], meta: dict) -> str:
  return json.dumps({"meta": meta, "settings": [
      {"setting": r.setting, "metrics": r.metrics, "retrieval": r.retrieval,
       "seconds": r.seconds} for r in results]}, indent=2, default=float)


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend, for the report plots."""
  from matplotlib import pyplot as plt  # noqa: PLC0415  (heavy; only when a plot is written)
  plt.switch_backend("Agg")
  return plt


def plot_recall_at_k(results: Sequence[SettingResult], ks: Sequence[int], path, title: str):
  """Recall@K against K, one line per setting (PNG)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for r in results:
    ax.plot(ks, [r.metrics[f"recall@{k}"] for k in ks], marker="o",
            linewidth=2.5 if r.setting == "m-m" else 1.2, label=r.setting)
  ax.set_xscale("log")
  ax.set_xticks(list(ks), [str(k) for k in ks])
  ax.set_xlabel("K")
  ax.set_ylabel("Recall@K")
  ax.set_ylim(0, 1.02)
  ax.grid(True, alpha=0.3)
  ax.set_title(title)
  ax.legend(ncol=3, fontsize=8, loc="lower right")
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  return atomic_write(path, png.getvalue())


def write_eval_reports(results: Sequence[SettingResult], ks: Sequence[int], out_dir,
                       step: int | None, meta: dict) -> dict[str, epath.PathLike]:
  """eval_<step>.md / .json / _recall_at_k.png under out_dir, plus latest.* copies."""
  out_dir = epath.Path(out_dir)
  tag = f"step_{step}" if step is not None else "final"
  title = f"Recall@K, {meta.get('pairs', '?')} pairs" + (f", step {step}" if step is not None else "")
  md = (f"# Same-style retrieval, {tag}\n\n{meta.get('pairs', '?')} query pairs, gallery of "
        f"{meta.get('gallery', '?')} distinct recalls; ranks break ties pessimistically.\n\n"
        + markdown_table(results, ks))
  paths = {"markdown": atomic_write(out_dir / f"eval_{tag}.md", md),
           "json": atomic_write(out_dir / f"eval_{tag}.json", results_json(results, meta)),
           "plot": plot_recall_at_k(results, ks, out_dir / f"eval_{tag}_recall_at_k.png", title)}
  atomic_write(out_dir / "latest.md", md)
  atomic_write(out_dir / "latest.json", results_json(results, meta))
  return paths


def write_tensorboard(results: Sequence[SettingResult], tb_dir, step: int | None) -> None:
  writer = TensorBoard(tb_dir)
  try:
    for key, value in scalars(results).items():
      if math.isfinite(value):
        writer.add_scalar(f"eval/{key}", value, step or 0)
  finally:
    writer.close()


# Image sources a results page may load: web and local files. Anything else (javascript:,
# data:, vbscript:, ...) in a catalog's image column never reaches an <img src>.
SAFE_IMAGE_SCHEMES = ("http", "https", "file")
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")
_IGNORED_BY_BROWSERS = re.compile(r"[\x00-\x20\x7f]")  # 'java\tscript:' is javascript:


def safe_image_src(uri) -> str | None:
  """`uri` if a page may use it as an image source (http(s), file, or a path without a
  scheme), else None."""
  if not uri or not isinstance(uri, str):
    return None
  probe = _IGNORED_BY_BROWSERS.sub("", uri)
  scheme = _SCHEME.match(probe)
  if scheme and scheme.group(1).lower() not in SAFE_IMAGE_SCHEMES:
    return None
  return uri.strip()


def search_html(title: str, query_html: str, hits: Sequence[dict], thumb_px: int) -> str:
  """A standalone page: the query, then one card per hit (image, id, title, score).
  Every value is escaped; an image URI with another scheme than SAFE_IMAGE_SCHEMES
  shows as 'no image'."""
  esc = html.escape
  cards = []
  for rank, h in enumerate(hits, start=1):
    src = safe_image_src(h.get("image_uri"))
    img = (f'<img src="{esc(src)}" loading="lazy">' if src
           else '<div class="noimg">no image</div>')
    extra = " · ".join(esc(f"{k}: {h[k]}") for k in ("supplier_id", "category") if h.get(k))
    cards.append(f'<div class="card">{img}<div class="meta"><b>#{rank}</b> '
                 f'<code>{esc(str(h["listing_id"]))}</code> score {h["score"]:.4f}<br>'
                 f'{esc(h.get("title", ""))}<br><small>{extra}</small></div></div>')
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ width: {thumb_px + 20}px; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }}
.card img, .query img {{ width: {thumb_px}px; height: {thumb_px}px; object-fit: contain; background: #fafafa; }}
.noimg {{ width: {thumb_px}px; height: {thumb_px}px; background: #eee; color: #999; display: flex;
  align-items: center; justify-content: center; }}
.meta {{ font-size: 12px; margin-top: 4px; word-wrap: break-word; }}
.query {{ margin-bottom: 1em; padding: 8px; background: #f4f7ff; border-radius: 6px; }}
</style></head><body>
<h2>{esc(title)}</h2>
<div class="query">{query_html}</div>
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
