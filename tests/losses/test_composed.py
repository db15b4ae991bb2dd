"""The composed-query path behind interactive search: the demo world's modification
triplets, the Grain sub-batch that carries them, the loss term and its config checks."""
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esspr_jax.config import compose, validate_config
from esspr_jax.config.data import world_config
from esspr_jax.demo_world import synthetic
from esspr_jax.input import esspr_tfds, images, pipeline
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.losses import loss_unit
from esspr_jax.models.tokenizer import Tokenizer
from support import write_jpeg

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ----------------------------------------------------------------------------- world
def _world_config(**sizes):
  cfg = world_config("tiny")
  cfg.update(sizes)
  return cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  cfg = _world_config(num_styles=48, num_sessions=40, image_size=24, composed_per_style=3)
  return cfg, synthetic.generate_world(cfg, tmp_path_factory.mktemp("composed_world"))


def _read(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def test_triplets_change_one_visible_attribute_and_keep_the_others(world):
  cfg, paths = world
  listings = {r["listing_id"]: r for r in _read(paths.catalog)}
  styles = {r["style_id"]: r for r in _read(paths.styles)}
  attrs = {k: dict(kv.split("=", 1) for kv in v["attributes"].split(";"))
           for k, v in styles.items()}
  rows = _read(paths.composed_pairs)
  manifest = json.loads(paths.manifest.read_text())
  assert len(rows) == manifest["counts"]["composed_pairs"] > 0
  train_styles = sum(s["split"] == "train" for s in styles.values())
  assert len(rows) <= cfg.composed_per_style * train_styles
  assert len({(r["trigger_id"], r["recall_id"]) for r in rows}) == len(rows)  # no duplicates
  changed = set()
  for r in rows:
    ref_id, change = r["trigger_id"].split("~")
    attribute, value = change.split("=")
    ref, target = listings[ref_id], listings[r["recall_id"]]
    ref_style, target_style = ref["style_id"], target["style_id"]
    # Both styles are training styles (eval styles never leak into training data).
    assert styles[ref_style]["split"] == styles[target_style]["split"] == "train"
    assert r["trigger_img"] == ref["image"] and r["recall_img"] == target["image"]
    assert r["recall_title"] == target["title"]
    assert attrs[target_style][attribute] == value != attrs[ref_style][attribute]
    category = synthetic.world_vocab.CATEGORY_BY_NAME[ref["cate_name"]]
    assert attribute in category.primary and category.attribute(attribute).visible
    # Only categories whose photo shows two or more primary attributes (not stock photos).
    assert sum(category.attribute(p).visible for p in category.primary) >= 2
    for p in category.primary:
      if p != attribute and category.attribute(p).visible:
        assert attrs[target_style][p] == attrs[ref_style][p], (r, p)
    # The words name the new value in one of its phrasings.
    assert any(phrase in r["trigger_title"]
               for phrase in category.attribute(attribute).phrases[value]), r
    changed.add(attribute)
  assert {"colour", "shape"} <= changed


def test_no_triplets_file_when_switched_off(tmp_path):
  cfg = _world_config(num_styles=16, num_sessions=10, image_size=16, composed_per_style=0)
  paths = synthetic.generate_world(cfg, tmp_path)
  assert not paths.composed_pairs.exists()
  assert json.loads(paths.manifest.read_text())["counts"]["composed_pairs"] == 0


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """12 pairs 'p{i}' and 8 triplets 'c{i}' (trigger title 'w{i}' / 'x{i}')."""
  root = tmp_path_factory.mktemp("composed_pipe")
  (root / "img").mkdir()
  for i in range(12):
    write_jpeg(root / "img" / f"{i}.jpg", (20 * i, 255 - 20 * i, 0))
  pairs = ["trigger_id,trigger_title,trigger_img,recall_id,recall_title,recall_img"]
  pairs += [f"p{i},w{i},{i}.jpg,q{i},w{i},{(i + 1) % 12}.jpg" for i in range(12)]
  triplets = ["trigger_id,trigger_title,trigger_img,recall_id,recall_title,recall_img"]
  triplets += [f"c{i},x{i},{i}.jpg,d{i},x{i},{i + 4}.jpg" for i in range(8)]
  (root / "pairs.csv").write_text("\n".join(pairs) + "\n")
  (root / "composed.csv").write_text("\n".join(triplets) + "\n")
  build = lambda csv_name, name: esspr_tfds.build_pairs_dataset(
      root / csv_name, root / "img", root / "tfds", name, max_image_side=32).source()
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(SPECIALS + [f"w{i}" for i in range(12)] +
                             [f"x{i}" for i in range(8)]) + "\n")
  return {"pairs": build("pairs.csv", "train_pairs"),
          "composed": build("composed.csv", "composed_pairs"),
          "tokenizer": Tokenizer.from_vocab_txt(vocab)}


def _make(sources, **kw):
  spec = pipeline.PipelineSpec(image_size=16, max_len=4, augment=images.AugmentParams())
  return pipeline.make_train_dataset(sources["pairs"], sources["tokenizer"], spec, 4,
                                     process_index=kw.pop("process_index", 0),
                                     process_count=kw.pop("process_count", 1),
                                     composed_source=sources["composed"], **kw)


def _composed_ids(batch):
  return (batch["composed"]["trigger"]["text_ids"][:, 1] - len(SPECIALS) - 12).tolist()


def test_batches_carry_a_composed_sub_batch_that_resumes_exactly(sources):
  it = iter(_make(sources, composed_batch_size=3))
  batch = next(it)
  assert set(batch) == {"trigger", "recall", "valid", "composed"}
  assert batch["trigger"]["image"].shape == (4, 16, 16, 3)
  sub = batch["composed"]
  assert set(sub) == {"trigger", "recall"}
  assert sub["trigger"]["image"].shape == sub["recall"]["image"].shape == (3, 16, 16, 3)
  ids = _composed_ids(batch)
  assert all(0 <= i < 8 for i in ids)
  # Each triplet's target title is its own ('x{i}' on both sides).
  assert (sub["recall"]["text_ids"][:, 1] == sub["trigger"]["text_ids"][:, 1]).all()
  seen = ids + [i for _ in range(4) for i in _composed_ids(next(it))]
  assert set(seen[:8]) == set(range(8))  # one shuffled pass over the triplets first
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  resumed = iter(_make(sources, composed_batch_size=3))
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    for side in ("trigger", "recall"):
      np.testing.assert_array_equal(got["composed"][side]["image"], w["composed"][side]["image"])
      np.testing.assert_array_equal(got["composed"][side]["text_ids"],
                                    w["composed"][side]["text_ids"])


def test_two_processes_split_the_triplets(sources):
  shares = [
      [i for b in [next(it) for _ in range(2)] for i in _composed_ids(b)]
      for it in (iter(_make(sources, composed_batch_size=2, process_index=p, process_count=2))
                 for p in range(2))]
  assert len(shares[0]) == len(shares[1]) == 4
  assert sorted(shares[0] + shares[1]) == list(range(8))


def test_empty_or_missing_sub_batch_is_a_clear_error(sources):
  with pytest.raises(ConfigError, match="composed_batch_size"):
    _make(sources, composed_batch_size=0)
  with pytest.raises(DataError, match="composed-query dataset is empty"):
    spec = pipeline.PipelineSpec(image_size=16, max_len=4)
    pipeline.make_train_dataset(sources["pairs"], sources["tokenizer"], spec, 4,
                                process_index=0, process_count=1, composed_source=[],
                                composed_batch_size=2)


# ----------------------------------------------------------------------------- loss
def _loss_config(**composed):
  config = compose("tiny").loss
  config.composed.update(dict(kind="infonce", weight=2.0) | composed)
  return config


def _sides(trigger, recall, query=None, target=None, reference=None):
  """loss_unit's sides; the composed sub-batch when query/target/reference are given."""
  sides = {"trigger": trigger, "recall": recall}
  if query is not None:
    sides["composed_trigger"] = {"m": jnp.asarray(query), "i": jnp.asarray(reference)}
    sides["composed_recall"] = {"m": jnp.asarray(target)}
  return sides


def _reference_composed(q, t, r, scale):
  """float64, one row at a time: rows over [targets ; references], columns over targets."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  q, t, r = unit(q), unit(t), unit(r)
  to_t, to_r = scale * q @ t.T, scale * q @ r.T
  rows = [np.log(np.exp(to_t[k]).sum() + np.exp(to_r[k]).sum()) - to_t[k, k]
          for k in range(len(q))]
  cols = [np.log(np.exp(to_t[:, k]).sum()) - to_t[k, k] for k in range(len(q))]
  return 0.5 * (np.mean(rows) + np.mean(cols))


def test_composed_term_matches_a_reference_and_adds_with_its_weight():
  rng = np.random.default_rng(0)
  side = lambda n: {v: jnp.asarray(rng.normal(size=(n, 8)), jnp.float32) for v in "itm"}
  trigger, recall = side(6), side(6)
  q, t, r = (rng.normal(size=(3, 8)).astype(np.float32) for _ in range(3))
  scale = jnp.log(10.0)
  base, base_terms = loss_unit(_sides(trigger, recall), _loss_config(weight=0.0),
                               logit_scale=scale)
  total, terms = loss_unit(_sides(trigger, recall, q, t, r), _loss_config(), logit_scale=scale)
  want = _reference_composed(*(x.astype(np.float64) for x in (q, t, r)), 10.0)
  np.testing.assert_allclose(float(terms["infonce/composed"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(total), float(base) + 2.0 * want, rtol=1e-5)
  assert "infonce/composed" not in base_terms
  # Moving the query onto its own reference (the photo alone) costs more than onto
  # its target: the reference is a negative.
  on_target = loss_unit(_sides(trigger, recall, t, t, r), _loss_config(),
                        logit_scale=scale)[1]["infonce/composed"]
  on_reference = loss_unit(_sides(trigger, recall, r, t, r), _loss_config(),
                           logit_scale=scale)[1]["infonce/composed"]
  assert float(on_reference) > float(on_target) + 1.0


def test_gradients_reach_query_and_target_but_not_the_reference():
  rng = np.random.default_rng(2)
  side = {v: jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for v in "itm"}
  q, t, r = (jnp.asarray(rng.normal(size=(3, 8)), jnp.float32) for _ in range(3))
  grads = jax.grad(lambda c: loss_unit(_sides(side, side, *c), _loss_config(),
                                       logit_scale=jnp.log(10.0))[0])((q, t, r))
  assert np.abs(np.asarray(grads[0])).sum() > 0 and np.abs(np.asarray(grads[1])).sum() > 0
  assert not np.asarray(grads[2]).any()


def test_term_on_without_a_sub_batch_names_the_key():
  rng = np.random.default_rng(1)
  side = {v: jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for v in "itm"}
  with pytest.raises(ConfigError, match="loss.composed.weight"):
    loss_unit(_sides(side, side), _loss_config(), logit_scale=jnp.log(10.0))
  with pytest.raises(ConfigError, match="loss.composed.kind"):
    loss_unit(_sides(side, side), _loss_config(kind="hinge"), logit_scale=jnp.log(10.0))


@pytest.mark.parametrize("override, key", [
    ({"train.composed_batch_size": 0}, "train.composed_batch_size"),
    ({"train.composed_batch_size": 6, "train.grad_accum_steps": 4}, "train.composed_batch_size"),
    ({"data.pipeline.composed_dataset": ""}, "data.pipeline.composed_dataset"),
    ({"data.pipeline.composed_dataset": "Bad Name"}, "data.pipeline.composed_dataset"),
    ({"model.image.enabled": False}, "loss.composed.weight"),
    ({"data.world.composed_per_style": -1}, "data.world.composed_per_style"),
])
def test_bad_composed_config_names_the_key(override, key):
  config = compose("demo")
  for dotted, value in override.items():
    node = config
    *path, last = dotted.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  if "model.image.enabled" in override:  # a text-only model: image pairs off as well
    for pair in config.loss.pairs:
      if "i" in pair or "m" in pair:
        config.loss.pairs[pair].weight = 0.0
    config.loss.pairs.t_t.weight = 1.0
    config.loss.pdc.i.weight = config.loss.plc.i.weight = 0.0
    config.loss.pdc.t.weight = config.loss.plc.t.weight = 0.0
  with pytest.raises(ConfigError) as e:
    validate_config(config)
  assert key in str(e.value)


def test_presets_switch_the_term_on_only_in_the_demo():
  assert compose("demo").loss.composed.weight > 0
  for preset in ("tiny", "base", "large"):
    assert compose(preset).loss.composed.weight == 0
  validate_config(compose("demo"))
