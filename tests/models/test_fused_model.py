"""EssprModel: exact modality masking, unit norms, dtype, remat/scan, modality subsets."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from esspr_jax.config import compose
from esspr_jax.errors import DataError
from esspr_jax.models import build_model
from esspr_jax.models.encoder import stack_layers, unstack_layers
from esspr_jax.models.text import TextTower
from support import set_dotted

BATCH, LENGTHS = 4, (5, 16, 2, 9)


def tiny_model_config(**changes):
  """The tiny preset's model section with `section__key=value` changes."""
  return set_dotted(compose("tiny").model, changes)


def make_side(config, seed=0):
  rng = np.random.default_rng(seed)
  length = config.tokenizer.max_len
  mask = (np.arange(length)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  ids = rng.integers(5, config.text.vocab_size, (BATCH, length)).astype(np.int32)
  ids[:, 0] = 2
  return {"image": rng.integers(0, 256, (BATCH, config.image.size, config.image.size, 3),
                                dtype=np.uint8),
          "text_ids": np.where(mask > 0, ids, 0).astype(np.int32), "text_mask": mask,
          "text_empty": np.zeros(BATCH, bool)}


def random_params(model, side, seed=1):
  """Random params of the model's shapes without compiling its init (keeps tests fast)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), side)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: rng.normal(0.0, 0.3, a.shape).astype(np.float32), shapes)


class Built:
  """A model, its params and a jitted apply, built once per config.

  params: given, or 'init' (the model's own initialiser), or random (default)."""

  def __init__(self, config, params=None):
    self.config = config
    self.model = build_model(config)
    self.side = make_side(config)
    if params is None:
      params = random_params(self.model, self.side)
    elif isinstance(params, str):
      params = nn.unbox(jax.jit(self.model.init)(jax.random.key(0), self.side)["params"])
    self.params = params
    self.apply = jax.jit(lambda p, side, modalities=("i", "t", "m"): self.model.apply(
        {"params": p}, side, modalities=modalities), static_argnums=2)

  def __call__(self, side, modalities=("i", "t", "m")):
    return {k: np.asarray(v) for k, v in self.apply(self.params, side, modalities).items()}


@pytest.fixture(scope="module")
def tiny():
  return Built(tiny_model_config(), params="init")


def test_three_unit_norm_embeddings(tiny):
  out = tiny(tiny.side)
  assert sorted(out) == ["i", "m", "t"]
  for name, emb in out.items():
    assert emb.shape == (BATCH, tiny.config.embed_dim) and emb.dtype == np.float32, name
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6, err_msg=name)
  # Distinct products and distinct modalities give distinct vectors.
  assert not np.allclose(out["i"], out["t"], atol=1e-3)
  assert not np.allclose(out["m"][0], out["m"][1], atol=1e-3)


def test_logit_params_init(tiny):
  np.testing.assert_allclose(tiny.params["logit_scale"], np.log(10.0), rtol=1e-7)
  np.testing.assert_allclose(tiny.params["logit_bias"], -10.0)


def _assert_masking_exact(built):
  base = built(built.side)
  other_image = dict(built.side, image=255 - built.side["image"])
  out = built(other_image)
  np.testing.assert_array_equal(out["t"], base["t"])  # bit-identical
  assert not np.allclose(out["i"], base["i"]) and not np.allclose(out["m"], base["m"])

  other_text = dict(built.side, text_ids=np.where(built.side["text_mask"] > 0,
                                                  (built.side["text_ids"] * 7 + 3) % 500 + 5, 0))
  out = built(other_text)
  np.testing.assert_array_equal(out["i"], base["i"])
  assert not np.allclose(out["t"], base["t"]) and not np.allclose(out["m"], base["m"])

  # Whatever sits in the padding positions cannot leak either.
  junk_padding = dict(built.side, text_ids=np.where(built.side["text_mask"] > 0,
                                                    built.side["text_ids"], 77).astype(np.int32))
  out = built(junk_padding)
  for name in "itm":
    np.testing.assert_array_equal(out[name], base[name])


def test_masking_is_exact_cls(tiny):
  _assert_masking_exact(tiny)


@pytest.mark.parametrize("pool", ["map", "mean"])
def test_masking_is_exact_other_pools(pool):
  _assert_masking_exact(Built(tiny_model_config(fused__pool=pool, image__depth=0, text__depth=0)))


def test_only_requested_modalities_run(tiny):
  text_side = {k: v for k, v in tiny.side.items() if k != "image"}  # no image: tower must not run
  only_t = tiny(text_side, modalities=("t",))
  assert list(only_t) == ["t"]
  np.testing.assert_allclose(only_t["t"], tiny(tiny.side)["t"], atol=1e-6)
  image_side = {"image": tiny.side["image"]}
  assert list(tiny(image_side, modalities=("i",))) == ["i"]


def test_input_errors_are_clear(tiny):
  with pytest.raises(DataError, match="text_ids"):
    tiny({"image": tiny.side["image"]}, modalities=("m",))
  with pytest.raises(DataError, match="uint8"):
    tiny(dict(tiny.side, image=tiny.side["image"].astype(np.float32)))
  with pytest.raises(ValueError, match="unknown modalities"):
    tiny(tiny.side, modalities=("x",))
  with pytest.raises(ValueError, match="model.image.size"):
    tiny(dict(tiny.side, image=np.zeros((BATCH, 40, 40, 3), np.uint8)))


def test_all_padding_text_row_is_finite(tiny):
  side = dict(tiny.side, text_mask=np.zeros_like(tiny.side["text_mask"]))
  for name, emb in tiny(side).items():
    assert np.isfinite(emb).all(), name


def test_sharded_over_a_mesh_equals_single_device(tiny):
  """Params placed by their logical axes (FSDP + tensor parallel), batch over data+fsdp."""
  train = compose("tiny").train
  rules = tuple(tuple(rule) for rule in train.sharding_rules)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  boxed = jax.eval_shape(tiny.model.init, jax.random.key(0), tiny.side)["params"]
  specs = nn.get_partition_spec(boxed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = jax.tree_util.tree_map(
        lambda spec: jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    params = jax.device_put(tiny.params, shardings)
    assert params["text"]["encoder"]["layer_0"]["attn"]["query"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor", None)
    side = jax.device_put(tiny.side, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    got = jax.jit(lambda p, s: tiny.model.apply({"params": p}, s))(params, side)
  want = tiny(tiny.side)
  for name in "itm":
    np.testing.assert_allclose(np.asarray(got[name]), want[name], atol=1e-6, err_msg=name)


def test_bfloat16_compute_close_to_float32(tiny):
  bf16 = Built(tiny_model_config(dtype="bfloat16"), params=tiny.params)
  want, got = tiny(tiny.side), bf16(tiny.side)
  for name in "itm":
    assert got[name].dtype == np.float32
    rel = np.linalg.norm(got[name] - want[name], axis=1) / np.linalg.norm(want[name], axis=1)
    assert rel.max() < 1e-2, (name, rel)
    assert rel.max() > 0, "bf16 run was not actually in bf16"


def test_scanned_model_param_tree_is_the_stacked_plain_tree(tiny):
  scanned = build_model(tiny_model_config(scan=True, remat=True, image__depth=2))
  plain = build_model(tiny_model_config(image__depth=2))
  shapes = lambda m: nn.unbox(jax.eval_shape(m.init, jax.random.key(0), tiny.side)["params"])
  scan_shapes, plain_shapes = shapes(scanned), shapes(plain)
  query = scan_shapes["image"]["encoder"]["layers"]["attn"]["query"]["kernel"]
  assert query.shape == (2, 32, 2, 16)
  stacked = jax.eval_shape(stack_layers, plain_shapes)
  assert jax.tree_util.tree_map(lambda a: a.shape, stacked) == jax.tree_util.tree_map(
      lambda a: a.shape, scan_shapes)
  back = jax.eval_shape(unstack_layers, stacked)
  assert jax.tree_util.tree_map(lambda a: a.shape, back) == jax.tree_util.tree_map(
      lambda a: a.shape, plain_shapes)


def test_text_only_model_follows_sentence_transformers_recipe():
  """0 fused layers + mean pool + no projections: t = normalised masked mean of the tower."""
  config = tiny_model_config(fused__num_layers=0, fused__pool="mean", fused__input_proj=False,
                             fused__output_proj=False, image__enabled=False)
  built = Built(config)
  assert "image" not in built.params
  assert "fused" not in built.params  # the head has no params at all
  side = {k: v for k, v in built.side.items() if k != "image"}
  out = built(side)
  assert list(out) == ["t"]
  with pytest.raises(ValueError, match="none of"):
    built(built.side, modalities=("i", "m"))
  got = out["t"]
  tower = TextTower.from_config(config)
  states, _ = tower.apply({"params": built.params["text"]}, side["text_ids"], side["text_mask"])
  states, mask = np.asarray(states, np.float64), side["text_mask"][..., None]
  mean = (states * mask).sum(1) / mask.sum(1)
  np.testing.assert_allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
