"""--mode=duplicates end to end on a tiny demo world and a trained-checkpoint stand-in:
the calibrated threshold against a brute-force recomputation, the clusters against
all-pairs components, a labelled-pairs CSV, the no-threshold case and the errors."""
import csv
import json
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from esspr_jax import checkpoint as checkpoint_lib
from esspr_jax import cli
from esspr_jax.config import compose, validate_config
from esspr_jax.config.data import world_config
from esspr_jax.demo_world import synthetic
from esspr_jax.errors import ConfigError
from esspr_jax.ingest import catalog as catalog_lib
from esspr_jax.input import tokenizer_stage
from esspr_jax.retrieval import export, restore
from esspr_jax.train import TrainState

TINY = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py"


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory):
  """A workdir with a tiny world (16 styles) and a checkpoint of the tiny model."""
  run = tmp_path_factory.mktemp("dup_run")
  cfg = world_config("tiny")
  cfg.num_styles = 16
  synthetic.generate_world(cfg, run / "world")
  ckpt = checkpoint_lib.Checkpointer(run / "checkpoints", every=1, keep=1, async_save=False)
  state = TrainState(step=jnp.asarray(2, jnp.int32), params=tiny.params,
                     opt_state={"mu": jax.tree_util.tree_map(jnp.zeros_like, tiny.params)})
  ckpt.save(2, state, iter(grain.MapDataset.range(4).to_iter_dataset()), force=True)
  ckpt.close()
  (run / "config.json").write_text(json.dumps(tiny.config.to_dict(), default=str))
  return run


@pytest.fixture(autouse=True)
def _tokenizer(tiny, monkeypatch):
  """The run's tokenizer is the tiny fixture's (no train dataset is built here)."""
  monkeypatch.setattr(tokenizer_stage, "load_tokenizer",
                      lambda config, data_dir=None: tiny.tokenizer)


def _run(run, *flags):
  return cli.execute(["esspr-jax", f"--config={TINY}", f"--workdir={run}", "--mode=duplicates",
                      "--config.eval.batch_size=4", *flags])


def _embeddings(tiny, run, catalog):
  config = compose("tiny")
  _, params, _ = restore.load_model_and_params(config, run)
  items, listings = export.read_catalog(config, catalog, pathlib.Path(catalog).parent)
  ids, emb = export.embed_items(tiny.model, params, items, tiny.config, tokenizer=tiny.tokenizer,
                                modalities=("m",))
  return [str(i) for i in ids], np.asarray(emb["m"], np.float64), listings


def _components(v, threshold):
  sim = v @ v.T
  a, b = np.nonzero(np.triu(sim >= threshold, 1))
  _, lab = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(len(v),) * 2),
                                directed=False)
  return lab


def test_demo_world_truth_calibrates_and_clusters(tiny, run_dir, capsys):
  assert _run(run_dir, "--config.duplicates.target_precision=0.3",
              "--config.duplicates.scope=all", "--config.duplicates.top_k=5") == 0
  out_dir = run_dir / "duplicates"
  for name in ("report.json", "thresholds.md", "pr_curve.png", "clusters.jsonl"):
    assert (out_dir / name).is_file(), name
  assert (out_dir / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report = json.loads((out_dir / "report.json").read_text())

  # A random-init model: precision barely passes the base rate (1/3), so the target is 0.3.
  # Brute force: the held-out styles' pairs, each listing's 5 nearest others as negatives.
  ids, v, listings = _embeddings(tiny, run_dir, run_dir / "world" / "catalog.csv")
  with open(run_dir / "world" / "styles.csv") as f:
    held_out = {r["style_id"] for r in csv.DictReader(f) if r["split"] == "eval"}
  style = [listings[i].style_id for i in ids]
  rows = [r for r in range(len(ids)) if style[r] in held_out]
  sim = v @ v.T
  pairs = {(a, b): 1 for a in rows for b in rows if a < b and style[a] == style[b]}
  for a in rows:
    others = sorted((r for r in rows if r != a), key=lambda r: -sim[a, r])[:5]
    for b in others:
      if style[a] != style[b]:
        pairs[(min(a, b), max(a, b))] = 0
  assert report["pairs"]["count"] == len(pairs)
  assert report["pairs"]["positives"] == sum(pairs.values())
  scores = {p: sim[p] for p in pairs}
  ok = [t for t in set(scores.values())
        if sum(pairs[p] for p in pairs if scores[p] >= t) / sum(scores[p] >= t for p in pairs) >= 0.3]
  cal = report["calibration"]
  assert cal["reached"] and cal["threshold"] == pytest.approx(min(ok), abs=1e-6)
  t = cal["threshold"]
  at = cal["at_threshold"]
  tp = sum(pairs[p] for p in pairs if scores[p] >= t - 1e-9)
  assert at["tp"] == tp and at["recall"] == pytest.approx(tp / sum(pairs.values()))

  # Clusters lie between the all-pairs components just above and just below t.
  clusters = [json.loads(line) for line in (out_dir / "clusters.jsonl").read_text().splitlines()]
  assert report["clusters"]["count"] == len(clusters) > 0
  row = {i: r for r, i in enumerate(ids)}
  fine, coarse = _components(v, t + 1e-5), _components(v, t - 1e-5)
  covered = set()
  for c in clusters:
    members = [row[i] for i in c["listing_ids"]]
    assert len({coarse[m] for m in members}) == 1 and c["size"] == len(members) >= 2
    assert c["min_score"] >= t - 1e-5
    covered.update(members)
  for comp in set(fine.tolist()):
    members = np.flatnonzero(fine == comp)
    if len(members) > 1:
      assert set(members.tolist()) <= covered
  quality = report["clusters"]["against_styles"]
  assert 0 <= quality["pair_precision"] <= 1 and quality["same_style_pairs_in_scope"] > 0
  table = (out_dir / "thresholds.md").read_text()
  assert "calibrated (precision >= 0.3)" in table and "best F1" in table
  out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[jax]")]
  assert [line.split(" ")[0] for line in out] == ["[duplicates]"] * 3
  assert f"threshold {t:.4f}" in out[1]


def _catalog_with_a_copy(run, tmp_path):
  """The world's catalog plus L_COPY: another listing of the first row's product by the
  same supplier (same photo, same title), which has no style id."""
  rows = list(catalog_lib.iter_catalog(str(run / "world" / "catalog.csv")))
  first = rows[0]
  copy = catalog_lib.Listing("L_COPY", first.supplier_id, first.cate_lv1_name, first.cate_name,
                             first.title, first.image)
  path = tmp_path / "catalog.csv"
  catalog_lib.write_catalog(path, rows + [copy])
  return path, rows


def _pairs_csv(path, pairs):
  header = ["cate_lv1_name", "cate_name", "trigger_id", "trigger_title", "recall_id",
            "recall_title", "trigger_img", "recall_img", "label"]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for a, b, label in pairs:
      w.writerow(["x", "y", a, "t", b, "t", "", "", label])
  return path


def test_labelled_pairs_csv_and_per_supplier_clusters(run_dir, tmp_path):
  catalog, rows = _catalog_with_a_copy(run_dir, tmp_path)
  first = rows[0].listing_id
  pairs = _pairs_csv(tmp_path / "pairs.csv", [(first, "L_COPY", 1)] +
                     [(first, r.listing_id, 0) for r in rows[1:8]])
  assert _run(run_dir, f"--catalog={catalog}", f"--image_dir={run_dir / 'world'}",
              f"--pairs={pairs}", "--config.duplicates.scope=supplier") == 0
  report = json.loads((run_dir / "duplicates" / "report.json").read_text())
  assert report["pairs"] == {"source": str(pairs), "count": 8, "positives": 1, "negatives": 7,
                             "skipped": {}}
  assert report["calibration"]["reached"]
  clusters = [json.loads(x) for x in
              (run_dir / "duplicates" / "clusters.jsonl").read_text().splitlines()]
  assert any({first, "L_COPY"} <= set(c["listing_ids"]) for c in clusters)
  for c in clusters:
    assert len(set(c["supplier_ids"])) == 1       # scope 'supplier'


def test_no_threshold_reaching_the_target_writes_no_clusters(run_dir, tmp_path, capsys):
  catalog, rows = _catalog_with_a_copy(run_dir, tmp_path)
  first = rows[0].listing_id
  # The copy scores highest of all and is labelled 0: precision never passes 1/2.
  pairs = _pairs_csv(tmp_path / "pairs.csv",
                     [(first, "L_COPY", 0), (first, rows[1].listing_id, 1)])
  assert _run(run_dir, f"--catalog={catalog}", f"--image_dir={run_dir / 'world'}",
              f"--pairs={pairs}") == 0
  report = json.loads((run_dir / "duplicates" / "report.json").read_text())
  assert report["calibration"]["reached"] is False and report["calibration"]["threshold"] is None
  assert (run_dir / "duplicates" / "clusters.jsonl").read_text() == ""
  assert "no threshold reaches precision 0.95" in capsys.readouterr().out


def test_bad_input_is_one_error_line(run_dir, tmp_path, capsys):
  pairs = _pairs_csv(tmp_path / "pairs.csv", [("L000000", "NOPE", 1)])
  assert _run(run_dir, f"--pairs={pairs}") == 2
  assert "1 pair ids are not in the catalog, e.g. ['NOPE (line 2)']" in capsys.readouterr().err
  plain = tmp_path / "plain.csv"   # no style_id column and no --pairs: nothing to calibrate on
  catalog_lib.write_catalog(plain, [catalog_lib.Listing(r.listing_id, r.supplier_id,
                                    r.cate_lv1_name, r.cate_name, r.title, r.image)
                                    for r in catalog_lib.iter_catalog(
                                        str(run_dir / "world" / "catalog.csv"))])
  assert _run(run_dir, f"--catalog={plain}", f"--image_dir={run_dir / 'world'}") == 2
  assert "no labelled pairs" in capsys.readouterr().err


def test_only_positive_pairs_are_an_error_and_half_labels_counted_skips(run_dir, tmp_path,
                                                                        capsys):
  """25.13: pairs all labelled 1 once gave "precision 1.0000" and clustered every listing;
  rows labelled 0.5 vanished uncounted."""
  catalog, rows = _catalog_with_a_copy(run_dir, tmp_path)
  first = rows[0].listing_id
  flags = [f"--catalog={catalog}", f"--image_dir={run_dir / 'world'}"]
  only = _pairs_csv(tmp_path / "only.csv", [(first, r.listing_id, 1) for r in rows[1:4]])
  assert _run(run_dir, *flags, f"--pairs={only}") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "none of the 3 pairs is labelled 0 (not a duplicate)" in err[0]
  half = _pairs_csv(tmp_path / "half.csv", [(first, "L_COPY", 1), (first, rows[1].listing_id, 0),
                                             (first, rows[2].listing_id, 0.5),
                                             (first, rows[3].listing_id, "maybe")])
  assert _run(run_dir, *flags, f"--pairs={half}") == 0
  report = json.loads((run_dir / "duplicates" / "report.json").read_text())
  assert report["pairs"]["count"] == 2 and report["pairs"]["skipped"] == {"bad_label": 2}
  assert "2 rows skipped ({'bad_label': 2})" in capsys.readouterr().out


@pytest.mark.parametrize("key, value, match", [
    ("scope", "everyone", "config.duplicates.scope: must be one of"),
    ("target_precision", 0.0, "config.duplicates.target_precision: must be in \\(0, 1\\]"),
    ("top_k", 0, "config.duplicates.top_k: must be an integer >= 1"),
    ("view", "x", "config.duplicates.view: must be one of"),
])
def test_config_section_is_validated(key, value, match):
  config = compose("tiny")
  assert config.duplicates.target_precision == 0.95 and config.duplicates.view == "m"
  config.duplicates[key] = value
  with pytest.raises(ConfigError, match=match):
    validate_config(config)
  config = compose("tiny")
  config.unlock()
  config.duplicates.extra = 1
  with pytest.raises(ConfigError, match="config.duplicates.extra: unknown key"):
    validate_config(config)
