"""Hard negatives in training: the catalog and table, the batches' side, a tiny real
run that mines and trains, kill/resume equality, and config errors naming their keys."""
import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from esspr_jax import stages, train
from esspr_jax.config import compose, validate_config
from esspr_jax.errors import ConfigError
from esspr_jax.hard_negatives import feed
from esspr_jax.hard_negatives import miner as miner_lib
from esspr_jax.hard_negatives.catalog import TrainingCatalog
from esspr_jax.hard_negatives.table import mine_table
from esspr_jax.input import esspr_tfds, pipeline
from esspr_jax.models.model import build_model, example_side
from support import write_jpeg

PAIRS = 16
HEADER = ("cate_lv1_name,cate_name,trigger_id,trigger_title,recall_id,recall_title,"
          "trigger_img,recall_img,label")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """16 pairs t{i}/r{i} in two leaf categories; listing r0 is also pair 15's recall
  with trigger t15 (so t0, r0, t15 are one same-style group)."""
  root = tmp_path_factory.mktemp("hn")
  (root / "img").mkdir()
  rows = [HEADER]
  for i in range(PAIRS):
    write_jpeg(root / "img" / f"t{i}.jpg", (15 * i, 250 - 15 * i, 30))
    write_jpeg(root / "img" / f"r{i}.jpg", (30, 15 * i, 250 - 15 * i))
    recall = "r0" if i == PAIRS - 1 else f"r{i}"
    cat = "cat" + str(i % 2) if i != PAIRS - 1 else "cat0"
    rows.append(f"top,{cat},t{i},red mug {i},{recall},blue mug {i},t{i}.jpg,{recall}.jpg,1")
  (root / "pairs.csv").write_text("\n".join(rows) + "\n")
  esspr_tfds.build_pairs_dataset(root / "pairs.csv", root / "img", root / "tfds",
                                 "train_pairs", max_image_side=64)
  pipeline.run_tokenizer(_config(root, 1), root / "tfds")  # the tokenizer stage
  return root


def _config(built, steps, **hn):
  config = compose("tiny")
  config.data.pipeline.data_dir = str(built / "tfds")
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.schedule.warmup_steps = 1
  config.train.schedule.name = "warmup_constant"  # the lr must not depend on train.steps
  config.train.log_every = 1
  config.train.checkpoint.every = 2
  config.train.checkpoint.async_save = False
  config.train.eval_at_end = False
  config.train.hard_negatives.update(dict(enabled=True, every_steps=2, per_trigger=2,
                                          max_cost_fraction=0.0) | hn)
  return config


def _train(config, workdir, **kw):
  """train() with the hooks the main job gives it: the miner."""
  return train.train(config, workdir, hooks=stages.training_hooks(config, workdir), **kw)


def _load(directory, up_to_step):
  """The built world's saved tables (16 pairs, 31 listings, 2 per trigger)."""
  return feed.load_versions(directory, up_to_step, pairs=PAIRS, listings=2 * PAIRS - 1,
                            per_trigger=2)


def _records(workdir, kind):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_catalog_groups_and_table(built):
  source = esspr_tfds.open_pairs_source(esspr_tfds.dataset_path(built / "tfds", "train_pairs"))
  catalog = TrainingCatalog(source)
  assert len(catalog) == 2 * PAIRS - 1  # r0 is shared
  assert catalog.ids[:3] == ["t0", "r0", "t1"]
  group = set(catalog.positives(catalog.trigger_row[0]).tolist())
  assert group == {catalog.ids.index(x) for x in ("t0", "r0", "t15")}
  rng = np.random.RandomState(0)
  emb = rng.randn(len(catalog), 4).astype(np.float32)
  table, scores = mine_table(catalog, emb, 2)
  assert table.shape == scores.shape == (PAIRS, 2)
  for i in range(PAIRS):
    t = catalog.trigger_row[i]
    positives = set(catalog.positives(t).tolist())
    assert not positives & set(table[i].tolist())
    assert (catalog.category[table[i]] == catalog.category[t]).all()
    # brute force: the two best same-category non-positives
    cands = [j for j in range(len(catalog)) if catalog.category[j] == catalog.category[t]
             and j not in positives]
    want = sorted(cands, key=lambda j: (-float(emb[t] @ emb[j]), j))[:2]
    assert table[i].tolist() == want


def test_versions_round_trip_and_apply_by_batch(tmp_path):
  versions = feed.Versions()
  a = feed.Version(0, 0, 2, np.zeros((3, 1), np.int64))
  b = feed.Version(7, 2, 4, np.ones((3, 1), np.int64))
  for v in (a, b):
    versions.install(v)
    feed.save_version(tmp_path, v)
  assert versions.table_for(6) is a.table and versions.table_for(7) is b.table
  fits = dict(pairs=3, listings=2, per_trigger=1)
  assert [v.mined_step for v in feed.load_versions(tmp_path, 1, **fits)] == [0]
  loaded = feed.load_versions(tmp_path, 5, **fits)
  assert [(v.first_batch, v.mined_step, v.next_step) for v in loaded] == [(0, 0, 2), (7, 2, 4)]
  np.testing.assert_array_equal(loaded[1].table, b.table)
  with pytest.raises(ValueError, match="batch 3"):
    versions.install(feed.Version(3, 4, 6, b.table))


def test_damaged_tables_are_set_aside_by_name_and_the_good_ones_load(tmp_path, caplog):
  """25.12: a truncated, garbage, object-dtype, out-of-range, -1, misshaped or altered
  table was a traceback (or an IndexError inside Grain, or silent training on the last
  listing); each is now named and moved to hard_negatives.corrupt/, nothing deleted."""
  d = tmp_path / "hard_negatives"
  good = np.arange(6, dtype=np.int64).reshape(3, 2)
  fits = dict(pairs=3, listings=6, per_trigger=2)
  feed.save_version(d, feed.Version(0, 0, 2, good))
  name = lambda step: d / f"mined-{step:09d}.npz"
  feed.save_version(d, feed.Version(5, 2, 4, good))
  name(2).write_bytes(name(2).read_bytes()[:-40])        # truncated, and from before hashes
  (d / "mined-000000002.npz.sha256").unlink()
  name(4).write_bytes(b"not a zip at all")                               # garbage
  np.savez(name(6), table=np.asarray([[1, 2]] * 3, object), first_batch=9, mined_step=6,
           next_step=8)                                                  # object dtype
  reasons = {8: (good + 1, "leave the catalog's 6 listings"), 10: (good - 1, "rows -1..4"),
             12: (good[:2], "shape (2, 2)"), 14: (good.astype(np.float32), "float32")}
  for step, (table, _) in reasons.items():
    feed.save_version(d, feed.Version(step + 3, step, step + 2, table))
  feed.save_version(d, feed.Version(19, 16, 18, good))
  np.savez(name(16), table=good[::-1].copy(), first_batch=19, mined_step=16, next_step=18)
  with caplog.at_level("WARNING"):
    loaded = feed.load_versions(d, 100, **fits)
  assert [v.mined_step for v in loaded] == [0]
  np.testing.assert_array_equal(loaded[0].table, good)
  assert sorted(p.name for p in d.iterdir()) == ["mined-000000000.npz",
                                                 "mined-000000000.npz.sha256"]
  aside = sorted(p.name.split("-")[1] for p in (tmp_path / "hard_negatives.corrupt").iterdir()
                 if not p.name.endswith(".sha256"))
  assert aside == [f"{s:09d}.npz" for s in (2, 4, 6, 8, 10, 12, 14, 16)]
  text = caplog.text
  assert "mined-000000002.npz is damaged (unreadable" in text
  assert "mined-000000016.npz is damaged (its bytes differ from" in text
  assert "mined-000000006.npz is damaged (unreadable" in text
  for _, reason in reasons.values():
    assert reason in text


def test_a_damaged_table_is_mined_again_on_resume(built, tmp_path):
  """25.12 end to end: the newest table of a finished 4-step run holds a -1 row; the
  resumed run sets it aside, mines again at its start and trains to step 6."""
  one = jax.devices()[:1]
  run = tmp_path / "run"
  _train(_config(built, steps=4), run, devices=one)
  bad = _load(run / "hard_negatives", 4)[-1]
  table = bad.table.copy()
  table[0, 0] = -1
  feed.save_version(run / "hard_negatives", dataclasses.replace(bad, table=table))
  result = _train(_config(built, steps=6), run, devices=one)
  assert result.step == 6 and result.resumed_from == 4
  assert [r["step"] for r in _records(run, "hard_negatives")] == [0, 2, 4]
  assert [p.name.rsplit("-", 1)[0] for p in (run / "hard_negatives.corrupt").iterdir()
          if not p.name.endswith(".sha256")] == ["mined-000000002.npz"]
  assert [v.mined_step for v in _load(run / "hard_negatives", 6)] == [0, 4]


def test_run_mines_trains_and_batches_hold_the_side(built, tmp_path):
  config = _config(built, steps=4)
  result = _train(config, tmp_path / "run")
  assert result.step == 4
  mined = _records(tmp_path / "run", "hard_negatives")
  assert [r["step"] for r in mined] == [0, 2]
  assert mined[0]["first_batch"] == 0 and mined[1]["first_batch"] > 2
  assert all(-1.0 <= r["mean_score"] <= 1.0 and 0 <= r["embed_seconds"] <= r["mine_seconds"] for r in mined)
  losses = [r["loss"] for r in _records(tmp_path / "run", "train")]
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert sorted(p.name for p in (tmp_path / "run" / "hard_negatives").iterdir()) == [
      "mined-000000000.npz", "mined-000000000.npz.sha256", "mined-000000002.npz",
      "mined-000000002.npz.sha256"]
  # The pipeline's batches: B * per_trigger hard-negative rows from the saved table.
  saved = _load(tmp_path / "run" / "hard_negatives", 0)
  m = miner_lib.from_config(config, tmp_path / "probe", built / "tfds", 8)
  m.versions.install(saved[0])
  batch = next(iter(pipeline.train_dataset(config, 8, data_dir=built / "tfds",
                                           hard_negatives=m.attach)))
  assert "source_index" not in batch
  side = batch["hard_negative"]
  assert side["text_ids"].shape[0] == 16 and side["image"].shape[0] == 16
  plain = next(iter(pipeline.train_dataset(config, 8, data_dir=built / "tfds")))
  np.testing.assert_array_equal(plain["trigger"]["text_ids"], batch["trigger"]["text_ids"])


def test_resumed_run_equals_uninterrupted(built, tmp_path):
  """An 8-step run, then a copy of it cut back to its step-4 checkpoint (as if killed
  there; its later table files stay, and must be ignored) resumed to 8: the losses of
  steps 5..8 and every table equal the uninterrupted run's. A lookahead of 4 batches
  makes the table mined at step 2 apply from batch 6, inside the resumed range."""
  one = jax.devices()[:1]  # compiles fastest; the 8-device split is test_run_...'s
  config = _config(built, steps=8)
  config.train.prefetch = 0
  config.data.pipeline.prefetch = 1
  assert miner_lib.lookahead(config) == 4
  full = tmp_path / "full"
  _train(config, full, devices=one)
  part = tmp_path / "part"
  shutil.copytree(full, part)
  (part / ".esspr-run.lock").unlink(missing_ok=True)
  for step in ("6", "8"):
    shutil.rmtree(part / "checkpoints" / step)
  before = len(_records(part, "train"))
  result = _train(config, part, devices=one)
  assert result.resumed_from == 4
  want = {r["step"]: r["loss"] for r in _records(full, "train")}
  resumed = _records(part, "train")[before:]
  assert [r["step"] for r in resumed] == [5, 6, 7, 8]
  for r in resumed:
    np.testing.assert_allclose(r["loss"], want[r["step"]], rtol=1e-5, err_msg=str(r["step"]))
  assert [r["step"] for r in _records(part, "hard_negatives")][-1:] == [6]  # it re-mined 6
  full_versions = _load(full / "hard_negatives", 8)
  part_versions = _load(part / "hard_negatives", 8)
  assert [(v.mined_step, v.first_batch) for v in full_versions] == [(0, 0), (2, 6), (4, 8),
                                                                    (6, 10)]
  assert len(part_versions) == len(full_versions)
  # The reloaded table of step 2 is not step 0's again: reloading it matters.
  assert not np.array_equal(full_versions[0].table, full_versions[1].table)
  for a, b in zip(full_versions, part_versions):
    assert (a.first_batch, a.mined_step, a.next_step) == (b.first_batch, b.mined_step,
                                                         b.next_step)
    np.testing.assert_array_equal(a.table, b.table)


def test_hard_negatives_without_the_miner_hook_are_refused(built, tmp_path):
  """The loop knows no miner: a run asking for hard negatives without its hook would
  silently train without them, so it is refused before compiling."""
  with pytest.raises(ConfigError, match=r"train\.hard_negatives\.enabled.*hooks"):
    train.train(_config(built, steps=1), tmp_path / "run")


def test_the_miner_cannot_feed_a_callers_dataset(built, tmp_path):
  config = _config(built, steps=1)
  with pytest.raises(ValueError, match="cannot feed a caller's train_dataset"):
    train.train(config, tmp_path / "run", train_dataset=iter([]),
                hooks=stages.training_hooks(config, tmp_path / "run"))


@pytest.mark.parametrize("key, value", [
    ("train.hard_negatives.per_trigger", 0),
    ("train.hard_negatives.every_steps", -3),
    ("train.hard_negatives.max_cost_fraction", 1.5),
    ("train.hard_negatives.max_cost_fraction", -0.1),
])
def test_bad_config_names_the_key(key, value):
  config = compose("tiny")
  _, name = key.rsplit(".", 1)
  config.train.hard_negatives[name] = value
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    validate_config(config)


def test_workers_are_refused_with_hard_negatives():
  config = compose("tiny")
  config.train.hard_negatives.enabled = True
  config.data.pipeline.worker_count = 2
  with pytest.raises(ConfigError, match=r"data\.pipeline\.worker_count"):
    validate_config(config)


def test_unknown_key_is_refused():
  config = compose("tiny")
  config.unlock()
  config.train.hard_negatives.per_query = 3
  with pytest.raises(ConfigError, match=r"train\.hard_negatives\.per_query"):
    validate_config(config)


def test_mining_waits_for_the_dispatched_steps_before_timing_itself(built, tmp_path, monkeypatch):
  """The train loop hands the miner params that steps still in flight will produce; the
  mining must wait for them before its clock starts, or their time counts as mining
  time and the cost bound postpones minings it should run (it did: 54 s 'embedding'
  vs 16 s in a real run). Here the params come from a slow computation still running."""
  config = _config(built, steps=1)
  m = miner_lib.from_config(config, tmp_path / "probe", built / "tfds", 8)
  model = build_model(config.model)
  params = model.init(jax.random.key(0), example_side(config.model))["params"]
  seen, real = [], m.embed_catalog

  def embed_catalog(model, params, modality, batch_sharding):
    seen.append(all(leaf.is_ready() for leaf in jax.tree.leaves(params)))
    return real(model, params, modality, batch_sharding)

  monkeypatch.setattr(m, "embed_catalog", embed_catalog)

  @jax.jit
  def slow(params, x):  # seconds of matmuls on which every leaf depends
    for _ in range(6):
      x = jax.numpy.tanh(x @ x)
    return jax.tree.map(lambda p: p + 0 * x[0, 0].astype(p.dtype), params)

  x = jax.numpy.ones((1536, 1536), jax.numpy.float32) / 1536
  slow(params, x)  # compiled before the timed call
  pending = slow(params, x)
  assert not all(leaf.is_ready() for leaf in jax.tree.leaves(pending))  # still in flight
  m.mine(model, pending, 0, at_start=True)
  assert seen == [True]
