"""The loss unit against an independent float64 loop implementation, plus the blocked
(chunked) and sharded forms, gradients at degenerate inputs, and config errors."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from esspr_jax.config import loss as loss_config
from esspr_jax.errors import ConfigError
from esspr_jax.losses import infonce, loss_unit

LOGIT_SCALE = 2.3
LOGIT_BIAS = -1.5
MAX_LOGIT_SCALE = 3.0


# ---------------------------------------------------------------- float64 reference
def ref_normalize(rows):
  out = []
  for row in rows:
    norm = math.sqrt(sum(float(v) * float(v) for v in row))
    out.append([float(v) / max(norm, 1e-12) for v in row])
  return out


def ref_dot(u, v):
  return sum(a * b for a, b in zip(u, v))


def ref_hinge(query, gallery, margin):
  n = len(query)
  total = 0.0
  for k in range(n):
    positive = ref_dot(query[k], gallery[k])
    row = 0.0
    for j in range(n):
      offset = margin if j != k else 0.0
      row += max(0.0, offset + ref_dot(query[k], gallery[j]) - positive)
    total += row / n
  return total / n


def ref_infonce(query, gallery, scale):
  n = len(query)
  logits = [[scale * ref_dot(query[k], gallery[j]) for j in range(n)] for k in range(n)]
  rows = sum(math.log(sum(math.exp(v) for v in logits[k])) - logits[k][k] for k in range(n))
  cols = sum(math.log(sum(math.exp(logits[k][j]) for k in range(n))) - logits[j][j]
             for j in range(n))
  return 0.5 * (rows + cols) / n


def ref_sigmoid(query, gallery, scale, bias):
  n = len(query)
  total = 0.0
  for k in range(n):
    for j in range(n):
      label = 1.0 if j == k else -1.0
      x = label * (scale * ref_dot(query[k], gallery[j]) + bias)
      total += math.log1p(math.exp(-x))  # -log sigmoid(x)
  return total / n


def ref_plc(single, fused, gallery, margin, top_k):
  n = len(gallery)
  k = min(top_k, n)
  total = 0.0
  for r in range(n):
    fused_scores = [ref_dot(fused[r], gallery[j]) for j in range(n)]
    neighbours = sorted(range(n), key=lambda j: -fused_scores[j])[:k]
    row = 0.0
    for j in neighbours:
      gap = fused_scores[j] - ref_dot(single[r], gallery[j])
      row += max(0.0, gap * gap - margin)
    total += row / k
  return total / n


def ref_terms(trigger, recall, cfg, scale, bias):
  """Every term the test config enables, computed term by term in float64."""
  a = {m: ref_normalize(x) for m, x in trigger.items()}
  b = {m: ref_normalize(x) for m, x in recall.items()}
  terms, weights = {}, {}
  prefix = {"hinge": "ppm", "infonce": "infonce", "sigmoid": "sigmoid"}
  for pair, entry in cfg.pairs.items():
    if entry.weight == 0:
      continue
    x, y = pair.split("_")
    name = f"{prefix[entry.kind]}/{x}-{y}"
    if entry.kind == "hinge":
      terms[name] = ref_hinge(a[x], b[y], entry.margin)
    elif entry.kind == "infonce":
      terms[name] = ref_infonce(a[x], b[y], scale)
    else:
      terms[name] = ref_sigmoid(a[x], b[y], scale, bias)
    weights[name] = entry.weight
  for view in ("t", "i"):
    terms[f"pdc/{view}"] = ref_hinge(a[view], a["m"], cfg.pdc[view].margin)
    weights[f"pdc/{view}"] = cfg.pdc[view].weight
    terms[f"plc/{view}"] = ref_plc(a[view], a["m"], b["m"], cfg.plc[view].margin,
                                   cfg.plc.top_k)
    weights[f"plc/{view}"] = cfg.plc[view].weight
  return sum(weights[n] * v for n, v in terms.items()), terms


# ---------------------------------------------------------------- fixtures
def mixed_config(chunk_size=0):
  """All three pair kinds, asymmetric pairs, distinct weights and margins."""
  cfg = loss_config.default_config("tiny")
  cfg.pairs.m_m.update(weight=1.0, margin=0.2)
  cfg.pairs.t_m.update(weight=0.5, margin=0.3)
  cfg.pairs.i_m.update(weight=0.7, margin=0.1)
  cfg.pairs.t_t.update(kind="infonce", weight=0.3)
  cfg.pairs.i_t.update(kind="infonce", weight=0.2)
  cfg.pairs.m_i.update(kind="sigmoid", weight=0.4)
  cfg.pairs.i_i.update(kind="sigmoid", weight=0.1)
  cfg.pdc.t.update(weight=0.6, margin=0.25)
  cfg.pdc.i.update(weight=0.8, margin=0.15)
  cfg.plc.t.update(weight=1.5, margin=0.01)
  cfg.plc.i.update(weight=2.0, margin=0.0)
  cfg.plc.top_k = 5
  cfg.max_logit_scale = MAX_LOGIT_SCALE
  cfg.chunk_size = chunk_size
  return cfg


def random_sides(batch, dim=6, seed=0):
  rng = np.random.RandomState(seed)
  side = lambda: {m: rng.randn(batch, dim).astype(np.float32) * rng.uniform(0.5, 3.0)
                  for m in "itm"}
  return side(), side()


def with_duplicates(trigger, recall):
  """Pair 3 repeats pair 1 (one copy scaled, which normalises to the same row)."""
  for side in (trigger, recall):
    for m in side:
      side[m][3] = 2.0 * side[m][1]
  recall["m"][5] = recall["m"][0]  # two recalls tie for every trigger's ranking
  return trigger, recall


def all_identical(batch, dim=6):
  row = np.random.RandomState(3).randn(dim).astype(np.float32)
  side = lambda: {m: np.tile(row, (batch, 1)) for m in "itm"}
  return side(), side()


def small_config(chunk_size=0):
  """One term of each kind, for the gradient and sharding tests (fewer compiles)."""
  cfg = loss_config.default_config("tiny")
  for entry in cfg.pairs.values():
    entry.weight = 0.0
  cfg.pairs.t_m.update(weight=1.0, margin=0.3)
  cfg.pairs.i_t.update(kind="infonce", weight=0.5)
  cfg.pairs.m_m.update(kind="sigmoid", weight=0.4)
  cfg.pdc.i.weight = 0.0
  cfg.plc.t.weight = 0.0
  cfg.plc.i.margin = 0.0
  cfg.plc.top_k = 5
  cfg.max_logit_scale = MAX_LOGIT_SCALE
  cfg.chunk_size = chunk_size
  return cfg


CASES = {  # B = 7 everywhere but b1, so the jitted loss compiles once per chunk size
    "random": lambda: random_sides(7),
    "b1": lambda: random_sides(1, seed=1),
    "duplicate_rows": lambda: with_duplicates(*random_sides(7, seed=2)),
    "identical_rows": lambda: all_identical(7),
}


def sides(trigger, recall):
  return {"trigger": trigger, "recall": recall}


@functools.lru_cache(maxsize=None)
def jitted_unit(chunk_size):
  """(mixed config, jitted loss_unit), built once per chunk size for the module."""
  cfg = mixed_config(chunk_size)
  return cfg, jax.jit(lambda a, b, s, c: loss_unit(sides(a, b), cfg, logit_scale=s, logit_bias=c))


@functools.lru_cache(maxsize=None)
def jitted_total_and_grads(chunk_size):
  cfg = small_config(chunk_size)
  fn = lambda a, b, s, c: loss_unit(sides(a, b), cfg, logit_scale=s, logit_bias=c)[0]
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))


def total_and_grads(trigger, recall, chunk_size):
  return jitted_total_and_grads(chunk_size)(
      trigger, recall, jnp.float32(LOGIT_SCALE), jnp.float32(LOGIT_BIAS))


# ---------------------------------------------------------------- value tests
@pytest.mark.parametrize("chunk_size", [0, 3], ids=["plain", "chunked"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_terms_and_total_match_float64_reference(case, chunk_size):
  trigger, recall = CASES[case]()
  cfg, fn = jitted_unit(chunk_size)
  total, terms = fn(trigger, recall, LOGIT_SCALE, LOGIT_BIAS)
  want_total, want_terms = ref_terms(trigger, recall, cfg, math.exp(LOGIT_SCALE), LOGIT_BIAS)
  assert set(terms) == set(want_terms)
  for name, want in want_terms.items():
    np.testing.assert_allclose(float(terms[name]), want, rtol=2e-5, atol=2e-6, err_msg=name)
  np.testing.assert_allclose(float(total), want_total, rtol=2e-5, atol=2e-6)


def test_identical_rows_give_closed_form_values():
  """Ties everywhere: hinge = margin (B-1)/B, InfoNCE = log B, PLC = 0."""
  trigger, recall = all_identical(7)
  _, fn = jitted_unit(0)
  _, terms = fn(trigger, recall, LOGIT_SCALE, LOGIT_BIAS)
  np.testing.assert_allclose(float(terms["ppm/m-m"]), 0.2 * 6 / 7, rtol=1e-6)
  np.testing.assert_allclose(float(terms["infonce/t-t"]), math.log(7), rtol=1e-6)
  assert float(terms["plc/t"]) == 0.0


def test_paper_default_has_the_papers_terms():
  trigger, recall = random_sides(6)
  config = loss_config.default_config("demo")
  config.composed.weight = 0.0  # our composed-query term, not the paper's (test_composed.py)
  total, terms = jax.jit(lambda a, b: loss_unit(sides(a, b), config))(trigger, recall)
  assert sorted(terms) == ["pdc/i", "pdc/t", "plc/i", "plc/t", "ppm/i-m", "ppm/m-m",
                           "ppm/t-m"]
  np.testing.assert_allclose(float(total), sum(float(v) for v in terms.values()), rtol=1e-6)


def test_logit_scale_is_clipped_to_max():
  trigger, recall = random_sides(6)
  a, b = ref_normalize(trigger["t"]), ref_normalize(recall["t"])
  fn = jax.jit(jax.value_and_grad(
      lambda s: infonce(jnp.asarray(a), jnp.asarray(b), s, MAX_LOGIT_SCALE)))
  (at_max, _), (above, grad_above), (_, grad_below) = (
      fn(MAX_LOGIT_SCALE), fn(MAX_LOGIT_SCALE + 5.0), fn(1.0))
  assert float(at_max) == float(above)
  np.testing.assert_allclose(float(above), ref_infonce(a, b, math.exp(MAX_LOGIT_SCALE)),
                             rtol=2e-5)
  assert float(grad_above) == 0.0 and float(grad_below) != 0.0


# ---------------------------------------------------------------- chunked == plain
B_GRAD = 16  # chunk 5: 4 strided blocks of 5 rows, 4 of them padding
CHUNK = 5


def buffers_of_at_least(compiled_text, elements):
  """Array shapes in compiled HLO with >= `elements` entries."""
  shapes = re.findall(r"(?:f32|pred|s32)\[([\d,]+)\]", compiled_text)
  return sorted({s for s in shapes if math.prod(int(d) for d in s.split(",")) >= elements})


@pytest.fixture(scope="module")
def plain_grads():
  trigger, recall = random_sides(B_GRAD, seed=4)
  return trigger, recall, total_and_grads(trigger, recall, 0)


def test_chunked_matches_plain_value_and_gradients(plain_grads):
  trigger, recall, (want_value, want_grads) = plain_grads
  value, grads = total_and_grads(trigger, recall, CHUNK)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  flat, want_flat = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)
  assert len(flat) == len(want_flat) == 8  # 3 + 3 embeddings, scale, bias
  for got, want in zip(flat, want_flat):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  (trigger_grads, recall_grads, scale_grad, bias_grad) = grads
  used = [*trigger_grads.values(), recall_grads["t"], recall_grads["m"], scale_grad, bias_grad]
  assert all(float(jnp.abs(g).max()) > 1e-4 for g in used)
  assert float(jnp.abs(recall_grads["i"]).max()) == 0.0  # no term reads the recall's i


def test_chunked_never_holds_a_batch_by_batch_buffer(plain_grads):
  """Forward and backward: no buffer of B*B entries (the plain form has several)."""
  trigger, recall, _ = plain_grads
  args = (trigger, recall, jnp.float32(LOGIT_SCALE), jnp.float32(LOGIT_BIAS))
  texts = {c: jitted_total_and_grads(c).lower(*args).compile().as_text() for c in (0, CHUNK)}
  assert f"{B_GRAD},{B_GRAD}" in buffers_of_at_least(texts[0], B_GRAD * B_GRAD)
  assert buffers_of_at_least(texts[CHUNK], B_GRAD * B_GRAD) == []


@pytest.mark.parametrize("chunk_size", [0, CHUNK])
@pytest.mark.parametrize("kind", ["identical", "zero"])
def test_gradients_finite_for_degenerate_embeddings(kind, chunk_size):
  if kind == "identical":
    trigger, recall = all_identical(B_GRAD)
  else:
    trigger, recall = random_sides(B_GRAD)
    trigger["m"][:] = 0.0  # every fused trigger is the zero vector
    recall["t"][2] = 0.0   # and one recall text row
  value, grads = total_and_grads(trigger, recall, chunk_size)
  assert np.isfinite(float(value))
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- global-batch negatives
@pytest.mark.parametrize("chunk_size, axis_type", [(0, "explicit"), (CHUNK, "explicit"),
                                                   (CHUNK, "auto")])
def test_sharded_batch_uses_global_negatives(plain_grads, chunk_size, axis_type):
  """Batch rows split over 8 devices: same loss and gradients as on one device."""
  assert len(jax.devices()) == 8, "tests/conftest.py should give 8 virtual CPU devices"
  trigger, recall, (want_value, want_grads) = plain_grads
  axis = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_type]
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis,))
  rows = NamedSharding(mesh, P("data", None))
  trigger_sharded = jax.device_put(trigger, rows)
  assert {s.data.shape for s in trigger_sharded["m"].addressable_shards} == {(2, 6)}
  value, grads = total_and_grads(trigger_sharded, jax.device_put(recall, rows), chunk_size)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
  # A per-device loss (negatives only from the local 2 rows) would be different.
  local = np.mean([float(total_and_grads({m: x[i:i + 2] for m, x in trigger.items()},
                                         {m: x[i:i + 2] for m, x in recall.items()}, 0)[0])
                   for i in range(0, B_GRAD, 2)])
  assert abs(local - float(want_value)) > 1e-2


# ---------------------------------------------------------------- errors
def whole_config(loss=None, image_enabled=None):
  model = ml_collections.ConfigDict()
  if image_enabled is not None:
    model.image = ml_collections.ConfigDict({"enabled": image_enabled})
  return ml_collections.ConfigDict(
      {"loss": loss if loss is not None else loss_config.default_config("tiny"),
       "model": model})


@pytest.mark.parametrize("preset", ["tiny", "demo", "base", "large"])
def test_default_configs_validate(preset):
  loss_config.validate(whole_config(loss_config.default_config(preset)))


def _set(path, value):
  def mutate(cfg):
    *parents, leaf = path.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return mutate


def _all_off(cfg):
  for entry in cfg["pairs"].values():
    entry["weight"] = 0.0
  for term in ("pdc", "plc"):
    for view in ("t", "i"):
      cfg[term][view]["weight"] = 0.0


def _unknown_pair(cfg):
  cfg["pairs"]["m_x"] = {"kind": "hinge", "weight": 1.0, "margin": 0.1}


@pytest.mark.parametrize("mutate, key", [
    (_set("pairs.m_m.kind", "triplet"), "loss.pairs.m_m.kind"),
    (_set("pairs.t_m.weight", -1.0), "loss.pairs.t_m.weight"),
    (_set("pairs.i_m.margin", -0.5), "loss.pairs.i_m.margin"),
    (_set("pdc.t.margin", -0.1), "loss.pdc.t.margin"),
    (_set("plc.top_k", 0), "loss.plc.top_k"),
    (_set("plc.top_k", 2.5), "loss.plc.top_k"),
    (_set("chunk_size", -1), "loss.chunk_size"),
    (_set("max_logit_scale", float("nan")), "loss.max_logit_scale"),
    (_set("similarity_precision", "fast"), "loss.similarity_precision"),
    (_all_off, "loss.pairs"),
    (_unknown_pair, "loss.pairs.m_x"),
])
def test_validate_names_the_bad_key(mutate, key):
  # Mutated as a plain dict: ConfigDict's own type checks would catch some of these
  # first, but configs built in Python (or loaded from dicts) only meet validate().
  loss = loss_config.default_config("tiny").to_dict()
  mutate(loss)
  with pytest.raises(ConfigError) as err:
    loss_config.validate(whole_config(ml_collections.ConfigDict(loss)))
  assert err.value.key == key
  with pytest.raises(ConfigError) as err:
    loss_unit(sides(*random_sides(3)), loss, logit_scale=1.0, logit_bias=0.0)
  assert err.value.key == key  # the same check guards the call


def test_text_only_model_needs_text_only_terms():
  with pytest.raises(ConfigError) as err:
    loss_config.validate(whole_config(image_enabled=False))
  assert err.value.key == "loss.pairs.i_m.weight"  # first enabled pair needing i or m
  loss = loss_config.default_config("tiny")
  _all_off(loss)
  loss.pairs.t_t.update(kind="infonce", weight=1.0)
  loss_config.validate(whole_config(loss, image_enabled=False))
  text_only = {"t": random_sides(3)[0]["t"]}
  _, terms = jax.jit(lambda e: loss_unit(sides(e, e), loss, logit_scale=1.0))(text_only)
  rows = ref_normalize(text_only["t"])
  np.testing.assert_allclose(float(terms["infonce/t-t"]), ref_infonce(rows, rows, math.e),
                             rtol=2e-5)


def test_call_time_errors_are_clear():
  trigger, recall = random_sides(4)
  text_only = {"t": trigger["t"]}
  with pytest.raises(ConfigError, match=r"loss\.pairs\.i_m.*'i'.*\['t'\]"):
    loss_unit(sides(text_only, {"t": recall["t"]}), loss_config.default_config("tiny"))
  recall_short = {m: x[:3] for m, x in recall.items()}
  with pytest.raises(ValueError, match="shared B and E"):
    loss_unit(sides(trigger, recall_short), loss_config.default_config("tiny"))
  with pytest.raises(ConfigError, match="needs logit_scale"):
    loss_unit(sides(trigger, recall), mixed_config())
  with pytest.raises(ConfigError, match="needs logit_bias"):
    loss_unit(sides(trigger, recall), mixed_config(), logit_scale=1.0)


def test_plan_views_are_exactly_what_the_terms_read():
  from esspr_jax.config.loss_plan import plan_terms  # noqa: PLC0415
  demo = loss_config.default_config("demo")
  # The paper's terms read every trigger view but only the fused recall; the composed
  # term reads the reference photo's fused and image-only views and the target's fused.
  assert plan_terms(demo).views() == {
      "composed_recall": ("m",), "composed_trigger": ("i", "m"),
      "recall": ("m",), "trigger": ("i", "t", "m")}
  demo.composed.weight = 0.0
  assert plan_terms(demo).views() == {"recall": ("m",), "trigger": ("i", "t", "m")}
  loss = loss_config.default_config("tiny")
  _all_off(loss)
  loss.pairs.t_i.update(kind="infonce", weight=1.0)
  assert plan_terms(loss).views() == {"recall": ("i",), "trigger": ("t",)}
