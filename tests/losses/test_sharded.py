"""The loss on a batch split over devices: each device scores only its own query rows.

Checked on 8 virtual devices, the way the train step runs it (inside `jax.set_mesh`
and flax's logical axis rules, the batch sharded over the rules' 'batch' axes):
- values and gradients equal the single-device loss, for every term kind, plain and
  chunked, with the batch over `data` and over (`data`, `fsdp`);
- the compiled HLO never all-gathers a [B, B] score matrix or a [chunk, B] block;
- per-device temporary memory falls with the device count.
"""
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from esspr_jax import sharding
from esspr_jax.config import loss as loss_config
from esspr_jax.config import train as train_config
from esspr_jax.losses import loss_unit

LOGIT_SCALE, LOGIT_BIAS = 2.3, -1.5
DIM = 8
RULES = sharding.rules(train_config.default_config("tiny"))  # 'batch' -> (data, fsdp)


def every_kind_config(chunk_size, composed=True):
  """One term of every kind: hinge (PPM and PDC), infonce, sigmoid, locality (PLC) and,
  when `composed`, the composed-query term."""
  cfg = loss_config.default_config("demo")
  cfg.pairs.t_m.weight = cfg.pairs.i_m.weight = 0.0
  cfg.pairs.t_t.update(kind="infonce", weight=0.3)
  cfg.pairs.m_i.update(kind="sigmoid", weight=0.4)
  cfg.pdc.t.weight = 0.0
  cfg.plc.i.weight = 0.0
  cfg.plc.t.update(weight=1.5, margin=0.0)
  cfg.plc.top_k = 5
  cfg.max_logit_scale = 3.0
  cfg.composed.weight = 0.5 if composed else 0.0
  cfg.chunk_size = chunk_size
  return cfg


def make_mesh(data, fsdp):
  return sharding.make_mesh(ml_collections.ConfigDict(
      {"mesh": {"data": data, "fsdp": fsdp, "tensor": 1}}))


def random_inputs(batch, composed_batch=0, seed=0):
  rng = np.random.RandomState(seed)
  emb = lambda rows, views: {m: rng.randn(rows, DIM).astype(np.float32) for m in views}
  sides = {"trigger": emb(batch, "itm"), "recall": emb(batch, "itm")}
  if composed_batch:
    sides["composed_trigger"] = emb(composed_batch, "im")
    sides["composed_recall"] = emb(composed_batch, "m")
  return sides


def loss_and_grads_fn(cfg):
  """jit(value_and_grad) of the total over (sides, logit_scale, logit_bias); terms as aux."""
  def total(sides, scale, bias):
    return loss_unit(sides, cfg, logit_scale=scale, logit_bias=bias)
  return jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)


def on_mesh(fn, mesh, sides):
  """jit `fn` as the train step does: the batch dim of every side sharded over the
  'batch' axes, scalars replicated, traced inside set_mesh + the logical rules."""
  rows = sharding.batch_sharding(mesh, RULES)
  repl = sharding.replicated(mesh)
  shardings = (jax.tree_util.tree_map(lambda _: rows, sides), repl, repl)
  jitted = jax.jit(fn, in_shardings=shardings)

  def call(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
      return jitted.lower(*args)
  call.lower = lower
  return call


def abstract_sides(batch, composed_batch=0):
  side = lambda rows, views: {m: jax.ShapeDtypeStruct((rows, DIM), jnp.float32)
                              for m in views}
  sides = {"trigger": side(batch, "itm"), "recall": side(batch, "itm")}
  if composed_batch:
    sides["composed_trigger"] = side(composed_batch, "im")
    sides["composed_recall"] = side(composed_batch, "m")
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  return sides, scalar, scalar


# ---------------------------------------------------------------- equal to one device
B_EQUAL, COMPOSED_B = 64, 16
# No term reads the recall's text view; the composed term's reference is a constant.
NO_GRADIENT = ("[0]['recall']['t']", "[0]['composed_trigger']['i']")
CHUNK = 24  # 3 of each device's 8 rows per block: 3 blocks, the last one padded


@functools.lru_cache(maxsize=None)
def single_device(chunk_size):
  inputs = random_inputs(B_EQUAL, COMPOSED_B, seed=chunk_size)
  fn = jax.jit(loss_and_grads_fn(every_kind_config(chunk_size)))
  return inputs, fn(inputs, jnp.float32(LOGIT_SCALE), jnp.float32(LOGIT_BIAS))


# Plain over `data` alone; chunked over (data, fsdp): the multi-axis row offsets and
# the per-device blocks together (two compiles fewer than the full cross product).
@pytest.mark.parametrize("chunk_size, layout", [(0, (8, 1)), (CHUNK, (2, 4))],
                         ids=["plain-data", "chunked-data+fsdp"])
def test_sharded_loss_equals_single_device(chunk_size, layout):
  inputs, ((want_total, want_terms), want_grads) = single_device(chunk_size)
  assert sorted(want_terms) == ["infonce/composed", "infonce/t-t", "pdc/i", "plc/t",
                                "ppm/m-m", "sigmoid/m-i"]
  mesh = make_mesh(*layout)
  fn = on_mesh(loss_and_grads_fn(every_kind_config(chunk_size)), mesh, inputs)
  (total, terms), grads = fn(inputs, jnp.float32(LOGIT_SCALE), jnp.float32(LOGIT_BIAS))
  for name, want in want_terms.items():
    np.testing.assert_allclose(float(terms[name]), float(want), rtol=1e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(float(total), float(want_total), rtol=1e-5)
  got_leaves = jax.tree_util.tree_leaves_with_path(grads)
  want_leaves = jax.tree_util.tree_leaves(want_grads)
  assert len(got_leaves) == len(want_leaves) == 11  # 3 + 3 + 2 + 1 embeddings, scale, bias
  for (path, got), want in zip(got_leaves, want_leaves):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  # Gradients reach every input some term reads (a wrong psum or gather would not).
  for path, got in got_leaves:
    if jax.tree_util.keystr(path) not in NO_GRADIENT:
      assert float(jnp.abs(got).max()) > 1e-4, jax.tree_util.keystr(path)


# ---------------------------------------------------------------- compiled HLO
B_HLO, CHUNK_HLO = 1024, 128


def all_gather_sizes(hlo_text):
  """Element counts of every array an all-gather in the compiled HLO produces."""
  sizes = []
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
    if match:
      for dims in re.findall(r"[a-z]\w*\[([\d,]*)\]", match.group(1)):
        sizes.append(math.prod(int(d) for d in dims.split(",") if d))
  return sizes


@pytest.mark.parametrize("chunk_size", [0, CHUNK_HLO], ids=["plain", "chunked"])
def test_no_all_gather_of_scores(chunk_size):
  """8 devices, B=1024, value and gradients: the gathers carry embeddings ([B, E]),
  never a [B, B] score matrix (plain) or a [chunk, B] block (chunked)."""
  block_rows = chunk_size or B_HLO
  mesh = make_mesh(8, 1)
  args = abstract_sides(B_HLO)
  fn = on_mesh(loss_and_grads_fn(every_kind_config(chunk_size, composed=False)), mesh,
               args[0])
  sizes = all_gather_sizes(fn.lower(*args).compile().as_text())
  assert sizes, "expected the gallery all-gathers"
  assert max(sizes) < block_rows * B_HLO, sorted(sizes)[-5:]
  assert max(sizes) <= B_HLO * DIM * 3  # at most the galleries themselves


# ---------------------------------------------------------------- memory
B_MEMORY = 4096


def temp_bytes(lowered):
  return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("chunk_size", [0, 512], ids=["plain", "chunked"])
def test_per_device_memory_shrinks_with_devices(chunk_size):
  """B=4096, value and gradients: one device of 8 needs at most 1/4 of the temporaries
  one device alone needs (an 8-way split of the scores would give about 1/8)."""
  cfg = every_kind_config(chunk_size, composed=False)
  args = abstract_sides(B_MEMORY)
  alone = temp_bytes(jax.jit(loss_and_grads_fn(cfg)).lower(*args))
  split = temp_bytes(on_mesh(loss_and_grads_fn(cfg), make_mesh(8, 1), args[0]).lower(*args))
  assert split <= alone / 4, (split / 2**20, alone / 2**20)
