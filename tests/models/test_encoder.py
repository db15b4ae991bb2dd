"""Encoder stack: scan and remat give the plain stack's outputs and gradients; dropout."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esspr_jax.models.encoder import Encoder, stack_layers, unstack_layers
from esspr_jax.models.layers import Attention

SETTINGS = dict(depth=3, heads=2, mlp_dim=24, norm="pre")
X = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)


def loss_and_grads(encoder, params):
  def loss(p, x):
    y = encoder.apply({"params": p}, x, MASK)
    return jnp.sum(jnp.sin(y) * jnp.arange(16.0)), y
  (value, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, X)
  return np.asarray(y), grads


@pytest.fixture(scope="module")
def plain():
  encoder = Encoder(**SETTINGS)
  params = nn.unbox(encoder.init(jax.random.key(0), X, MASK)["params"])
  return params, loss_and_grads(encoder, params)


@pytest.mark.parametrize("scan,remat", [(False, True), (True, True)])
def test_scan_and_remat_match_plain(plain, scan, remat):
  params, (want_y, (want_gp, want_gx)) = plain
  encoder = Encoder(**SETTINGS, scan=scan, remat=remat)
  own = nn.unbox(jax.eval_shape(encoder.init, jax.random.key(0), X, MASK)["params"])
  use = stack_layers(params) if scan else params
  assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(use)
  y, (gp, gx) = loss_and_grads(encoder, use)
  np.testing.assert_allclose(y, want_y, atol=1e-5)
  np.testing.assert_allclose(gx, want_gx, rtol=1e-4, atol=1e-5)
  if scan:
    gp = unstack_layers(gp)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         gp, want_gp)


def test_stack_unstack_round_trip(plain):
  params, _ = plain
  stacked = stack_layers({"tower": {"encoder": params}, "other": np.ones(3)})
  kernel = stacked["tower"]["encoder"]["layers"]["mlp"]["fc_in"]["kernel"]
  assert kernel.shape == (3, 16, 24)
  np.testing.assert_array_equal(kernel[2], params["layer_2"]["mlp"]["fc_in"]["kernel"])
  back = unstack_layers(stacked)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back["tower"]["encoder"], params)


def test_dropout_only_when_training(plain):
  params, (eval_y, _) = plain
  encoder = Encoder(**SETTINGS, dropout=0.3)
  run = jax.jit(lambda train, key: encoder.apply({"params": params}, X, MASK, train,
                                                 rngs={"dropout": key}), static_argnums=0)
  np.testing.assert_allclose(run(False, jax.random.key(1)), eval_y, atol=1e-6)
  a, b = run(True, jax.random.key(1)), run(True, jax.random.key(2))
  assert not np.allclose(a, eval_y, atol=1e-3) and not np.allclose(a, b, atol=1e-3)


def test_attention_with_no_visible_key_is_finite_and_ignores_values():
  attn = Attention(heads=2)
  x = jnp.asarray(X)
  params = attn.init(jax.random.key(0), x, x, MASK)["params"]
  hidden = np.zeros_like(MASK)
  out1 = attn.apply({"params": params}, x, x, hidden)
  out2 = attn.apply({"params": params}, x, x * 5.0 + 1.0, hidden)
  assert np.isfinite(out1).all()
  np.testing.assert_array_equal(out1, out2)
