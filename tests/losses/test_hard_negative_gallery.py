"""Hard negatives as extra gallery columns: the loss unit against float64 numpy, the
chunked form, the 8-device row split, and unchanged behaviour without the side."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esspr_jax.losses import loss_unit
from tests.losses.test_sharded import (LOGIT_BIAS, LOGIT_SCALE, loss_and_grads_fn,
                                       make_mesh, on_mesh)
from tests.losses.test_losses import MAX_LOGIT_SCALE, mixed_config, random_sides

B, N, DIM = 8, 2, 6


def normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def np_hinge(q, g, margin):
  """mean over the B queries and all G columns of max(0, margin[j!=k] + S_kj - S_kk)."""
  s = q @ g.T
  b, cols = s.shape
  offset = np.where(np.arange(cols)[None, :] == np.arange(b)[:, None], 0.0, margin)
  return np.maximum(0.0, offset + s - np.diag(s[:, :b])[:, None]).sum() / (b * cols)


def np_infonce(q, g, scale):
  logits = scale * (q @ g.T)
  b = q.shape[0]
  lse = lambda x, axis: np.log(np.exp(x).sum(axis=axis))
  pos = np.diag(logits[:, :b])
  rows = (lse(logits, 1) - pos).sum()
  cols = (lse(logits[:, :b], 0) - pos).sum()
  return 0.5 * (rows + cols) / b


def np_sigmoid(q, g, scale, bias):
  logits = scale * (q @ g.T) + bias
  b, cols = logits.shape
  sign = np.where(np.arange(cols)[None, :] == np.arange(b)[:, None], 1.0, -1.0)
  return np.log1p(np.exp(-sign * logits)).sum() / b


def hard_side(seed=1, rows=B * N):
  rng = np.random.RandomState(seed)
  return {m: rng.randn(rows, DIM).astype(np.float32) for m in "itm"}


def reference(trigger, recall, hard, cfg, scale, bias):
  a = {m: normalize(x) for m, x in trigger.items()}
  g = {m: np.concatenate([normalize(recall[m]), normalize(hard[m])]) for m in "itm"}
  prefix = {"hinge": "ppm", "infonce": "infonce", "sigmoid": "sigmoid"}
  out = {}
  for pair, entry in cfg.pairs.items():
    if entry.weight == 0:
      continue
    x, y = pair.split("_")
    if entry.kind == "hinge":
      value = np_hinge(a[x], g[y], entry.margin)
    elif entry.kind == "infonce":
      value = np_infonce(a[x], g[y], scale)
    else:
      value = np_sigmoid(a[x], g[y], scale, bias)
    out[f"{prefix[entry.kind]}/{x}-{y}"] = value
  return out


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_pair_terms_read_the_extra_columns(chunk_size):
  cfg = mixed_config(chunk_size)
  trigger, recall = random_sides(B, DIM)
  hard = hard_side()
  scale, bias = np.exp(min(LOGIT_SCALE, MAX_LOGIT_SCALE)), LOGIT_BIAS
  fn = jax.jit(lambda sides: loss_unit(sides, cfg, logit_scale=LOGIT_SCALE,
                                       logit_bias=LOGIT_BIAS))
  total, terms = fn({"trigger": trigger, "recall": recall, "hard_negative": hard})
  _, plain = fn({"trigger": trigger, "recall": recall})
  want = reference(trigger, recall, hard, cfg, scale, bias)
  assert len(want) == 7
  for name, value in want.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=2e-5, atol=1e-6, err_msg=name)
    assert abs(float(terms[name]) - float(plain[name])) > 1e-4, name  # the columns count
  # PDC and PLC read no recall gallery / the plain one: unchanged by the extra rows.
  for name in ("pdc/t", "pdc/i", "plc/t", "plc/i"):
    np.testing.assert_allclose(float(terms[name]), float(plain[name]), rtol=1e-6)
  assert np.isfinite(float(total))


def test_zero_extra_rows_equal_no_side():
  """An empty hard side (R=0) is the plain loss: the extension is exact."""
  cfg = mixed_config()
  trigger, recall = random_sides(B, DIM)
  fn = lambda sides: loss_unit(sides, cfg, logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)
  total, terms = fn({"trigger": trigger, "recall": recall, "hard_negative": hard_side(rows=0)})
  want_total, want_terms = fn({"trigger": trigger, "recall": recall})
  np.testing.assert_allclose(float(total), float(want_total), rtol=1e-6)
  for name in want_terms:
    np.testing.assert_allclose(float(terms[name]), float(want_terms[name]), rtol=1e-6)


def test_bad_hard_side_is_named():
  cfg = mixed_config()
  trigger, recall = random_sides(B, DIM)
  hard = hard_side()
  del hard["m"]
  with pytest.raises(ValueError, match="hard_negative"):
    loss_unit({"trigger": trigger, "recall": recall, "hard_negative": hard}, cfg,
              logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)
  wrong_dim = {m: np.zeros((4, DIM + 1), np.float32) for m in "itm"}
  with pytest.raises(ValueError, match=r"\[R, E\]"):
    loss_unit({"trigger": trigger, "recall": recall, "hard_negative": wrong_dim}, cfg,
              logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)


def test_row_split_equals_one_device():
  """8 virtual devices, batch over `data`, chunked: values and gradients (hard rows
  included) equal the one-device loss."""
  cfg = mixed_config(chunk_size=24)
  rng = np.random.RandomState(3)
  sides = {s: {m: rng.randn(rows, 8).astype(np.float32) for m in "itm"}
           for s, rows in (("trigger", 32), ("recall", 32), ("hard_negative", 64))}
  fn = loss_and_grads_fn(cfg)
  args = (jnp.float32(LOGIT_SCALE), jnp.float32(LOGIT_BIAS))
  (want_total, want_terms), want_grads = jax.jit(fn)(sides, *args)
  (total, terms), grads = on_mesh(fn, make_mesh(8, 1), sides)(sides, *args)
  np.testing.assert_allclose(float(total), float(want_total), rtol=1e-5)
  for name in want_terms:
    np.testing.assert_allclose(float(terms[name]), float(want_terms[name]), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(grads[0]["hard_negative"]["m"]).max()) > 1e-4
