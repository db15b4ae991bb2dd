"""ViT and text towers against an independent float64 NumPy transformer.

The reference reads the documented param layout (models/text.py, models/vit.py), so
these tests also pin that layout for the pretrained-checkpoint importer.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from esspr_jax.models.text import TextTower
from esspr_jax.models.vit import VisionTower, patchify

B, L, D, H, F = 2, 7, 16, 2, 24


def np_layer_norm(p, x, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_attention(p, x, mask):
  def heads(name):
    return np.einsum("bld,dhk->blhk", x, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = heads("query"), heads("key"), heads("value")
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", probs, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def np_mlp(p, x):
  h = x @ p["fc_in"]["kernel"] + p["fc_in"]["bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return h @ p["fc_out"]["kernel"] + p["fc_out"]["bias"]


def np_block(p, x, mask, norm, eps):
  if norm == "pre":
    x = x + np_attention(p["attn"], np_layer_norm(p["norm_attn"], x, eps), mask)
    return x + np_mlp(p["mlp"], np_layer_norm(p["norm_mlp"], x, eps))
  x = np_layer_norm(p["norm_attn"], x + np_attention(p["attn"], x, mask), eps)
  return np_layer_norm(p["norm_mlp"], x + np_mlp(p["mlp"], x), eps)


def as_f64(params):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nn.unbox(params))


def randomize(params, seed):
  """Random values everywhere (LayerNorm scale/bias too) so every param matters."""
  leaves, tree = jax.tree_util.tree_flatten(nn.unbox(params))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [np.asarray(rng.normal(0, 0.3, leaf.shape), np.float32) for leaf in leaves])


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_text_tower_matches_numpy_bert(norm):
  tower = TextTower(vocab_size=50, max_positions=10, type_vocab_size=2, width=D, depth=2,
                    heads=H, mlp_dim=F, norm=norm, ln_eps=1e-12, pooler=True)
  ids = np.array([[2, 9, 11, 3, 0, 0, 0], [2, 40, 41, 42, 43, 44, 3]], np.int32)
  mask = (np.arange(L)[None] < np.array([[4], [7]])).astype(np.int32)
  params = randomize(tower.init(jax.random.key(0), ids, mask)["params"], seed=1)
  states, pooled = tower.apply({"params": params}, ids, mask)

  p = as_f64(params)
  x = p["token_embed"]["embedding"][ids] + p["position_embed"]["embedding"][:L] \
      + p["type_embed"]["embedding"][0]
  x = np_layer_norm(p["embed_norm"], x, 1e-12)
  for i in range(2):
    x = np_block(p["encoder"][f"layer_{i}"], x, mask, norm, 1e-12)
  if norm == "pre":
    x = np_layer_norm(p["final_norm"], x, 1e-12)
  want_pooled = np.tanh(x[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
  np.testing.assert_allclose(states, x, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(pooled, want_pooled, atol=2e-4, rtol=2e-4)


def test_patchify_is_row_major_patches_of_row_col_channel_pixels():
  images = np.random.default_rng(0).integers(0, 255, (2, 12, 8, 3))
  got = np.asarray(patchify(jnp.asarray(images), 4))
  assert got.shape == (2, 6, 48)
  for b in range(2):
    for r in range(3):
      for c in range(2):
        np.testing.assert_array_equal(got[b, r * 2 + c],
                                      images[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4, :].reshape(-1))


@pytest.fixture(scope="module")
def vit_and_params():
  tower = VisionTower(image_size=16, patch=4, width=D, depth=2, heads=H, mlp_dim=F,
                      cls_token=True, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), ln_eps=1e-6)
  images = np.random.default_rng(2).integers(0, 256, (B, 16, 16, 3), dtype=np.uint8)
  params = randomize(tower.init(jax.random.key(0), images)["params"], seed=3)
  return tower, params, images


def test_vit_matches_numpy_reference(vit_and_params):
  tower, params, images = vit_and_params
  tokens, pooled = tower.apply({"params": params}, images)
  p = as_f64(params)
  x = (images / 255.0 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.25, 0.3])
  # Patch embedding as the strided convolution it replaces, kernel [p,p,3,D].
  kernel = p["patch_embed"]["kernel"].reshape(4, 4, 3, D)
  def window(r, c):
    return x[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4]
  conv = np.stack([np.stack([np.einsum("bijc,ijcd->bd", window(r, c), kernel) for c in range(4)], 1)
                   for r in range(4)], 1)
  x = conv.reshape(B, 16, D) + p["patch_embed"]["bias"]
  x = np.concatenate([np.broadcast_to(p["cls"], (B, 1, D)), x], axis=1) + p["pos_embed"]
  for i in range(2):
    x = np_block(p["encoder"][f"layer_{i}"], x, None, "pre", 1e-6)
  x = np_layer_norm(p["final_norm"], x, 1e-6)
  assert tokens.shape == (B, 17, D) and tower.num_tokens == 17
  np.testing.assert_allclose(tokens, x, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(pooled, x[:, 0], atol=2e-4, rtol=2e-4)


def test_default_normalisation_maps_uint8_to_minus_one_one():
  tower = VisionTower(image_size=8, patch=4, width=D, depth=0, heads=H, mlp_dim=F)
  pixels = jnp.asarray([[0, 255, 51]], jnp.uint8)
  np.testing.assert_allclose(tower.normalize(pixels), [[-1.0, 1.0, -0.6]], atol=1e-6)


def test_vit_rejects_wrong_image_size(vit_and_params):
  tower, params, _ = vit_and_params
  with pytest.raises(ValueError, match=r"model.image.size"):
    tower.apply({"params": params}, np.zeros((1, 20, 20, 3), np.uint8))


def test_logical_axis_names_on_every_param(vit_and_params):
  tower, _, images = vit_and_params
  boxed = tower.init(jax.random.key(0), images)["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert leaves and all(isinstance(a, nn.Partitioned) for a in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  specs = nn.get_partition_spec(boxed)
  assert specs["encoder"]["layer_0"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", "heads", "head_dim")
  assert specs["patch_embed"]["kernel"] == jax.sharding.PartitionSpec("patch_in", "embed")
