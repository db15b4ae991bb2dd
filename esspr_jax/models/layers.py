"""Transformer building blocks shared by the ViT, the text tower and the fused head.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the
main activations carry logical constraints (`nn.with_logical_constraint`); only
`config.train.sharding_rules` maps those names to mesh axes, so nothing here knows
the mesh. Outside a rules context the constraints are no-ops.

Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16).
Softmax and LayerNorm statistics run in float32 whatever the compute dtype.

Layouts (chosen so BERT / ViT checkpoints map on with at most a reshape per array):
  Dense:      kernel [in, out], bias [out]
  LayerNorm:  scale [D], bias [D]
  Attention:  query|key|value: kernel [D, H, Dh], bias [H, Dh]; out: kernel [H, Dh, D], bias [D]
  Mlp:        fc_in: kernel [D, F], bias [F]; fc_out: kernel [F, D], bias [D]; GELU (exact erf)
              by default; `act` picks the tanh GELU (SigLIP) or quick GELU (OpenAI CLIP)
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from esspr_jax.config.model import DTYPES

Names = Sequence[Optional[str]]

INIT_STD = 0.02  # BERT / ViT truncated-normal scale


# Activations of the MLPs: exact-erf GELU (BERT, ViT), tanh GELU (SigLIP, big_vision's
# nn.gelu default, HF 'gelu_pytorch_tanh'), x * sigmoid(1.702 x) (OpenAI CLIP's 'quick_gelu').
ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def compute_dtype(name: str):
  """The jnp dtype for a config dtype name (one of config.model.DTYPES)."""
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
  return jnp.dtype(name)


def normal_init(names: Names, std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(std), tuple(names))


def zeros_init(names: Names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def ones_init(names: Names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(names))


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Logical sharding constraint on an activation (no-op without axis rules)."""
  return nn.with_logical_constraint(x, tuple(names))


def dense(features: int, names: Names, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  """A dense layer (kernel [in, out], bias [out]) whose params carry `names` = (in, out)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=normal_init(names), bias_init=zeros_init(tuple(names)[-1:]),
                  name=name)


class Embedding(nn.Module):
  """Row lookup in a table `embedding` [N, D] whose axes are named `names`.

  The table's `D` axis is gathered (FSDP-style) before the lookup, so a table
  sharded over (vocab, embed) feeds a batch-sharded lookup without XLA falling
  back to replicating the whole gather."""
  num: int
  features: int
  names: tuple = ("vocab", "embed")
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    table = self.param("embedding", normal_init(self.names), (self.num, self.features),
                       jnp.float32)
    table = constrain(table, (self.names[0], None))
    return jnp.take(table, ids, axis=0).astype(self.dtype)


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over the last axis with `embed`-named scale and bias."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=ones_init(("embed",)), bias_init=zeros_init(("embed",)),
                      name=name)


class Mlp(nn.Module):
  """Position-wise feed-forward: Dense -> activation (`ACTIVATIONS[act]`) -> Dense."""
  hidden: int
  dropout: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  act: str = "gelu"

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = dense(self.hidden, ("embed", "mlp"), self.dtype, "fc_in")(x)
    h = ACTIVATIONS[self.act](h)
    h = constrain(h, ("batch", "seq", "act_mlp"))
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    return dense(width, ("mlp", "embed"), self.dtype, "fc_out")(h)


class HeadsIn(nn.Module):
  """x [..., D] -> [..., H, Dh] with kernel [D, H, Dh] and bias [H, Dh].

  Own params rather than nn.DenseGeneral: DenseGeneral initialises a flattened 2-D
  kernel and reshapes it, which breaks 3-name logical partitioning under a mesh."""
  heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", normal_init(("embed", "heads", "head_dim")),
                        (x.shape[-1], self.heads, self.head_dim), jnp.float32)
    bias = self.param("bias", zeros_init(("heads", "head_dim")), (self.heads, self.head_dim),
                      jnp.float32)
    return jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype)) \
        + bias.astype(self.dtype)


class HeadsOut(nn.Module):
  """[..., H, Dh] -> [..., D] with kernel [H, Dh, D] and bias [D]."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", normal_init(("heads", "head_dim", "embed")),
                        (x.shape[-2], x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", zeros_init(("embed",)), (self.features,), jnp.float32)
    return jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype)) \
        + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head dot-product attention with an exact key mask.

  Masked keys get probability exactly 0 (and a query with no visible key gets all
  zeros), so a masked token's value can never leak into the output: this is what
  makes the fused head's modality masking bit-exact. `causal=True` also hides every
  key after the query's position (CLIP's text tower).
  """
  heads: int
  dtype: jnp.dtype = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x_q, x_kv, key_mask: Optional[jax.Array] = None):
    """x_q [B,Lq,D], x_kv [B,Lk,D], key_mask bool [B,Lk] (True = visible)."""
    width = x_q.shape[-1]
    head_dim = width // self.heads
    q = HeadsIn(self.heads, head_dim, self.dtype, name="query")(x_q)
    k = HeadsIn(self.heads, head_dim, self.dtype, name="key")(x_kv)
    v = HeadsIn(self.heads, head_dim, self.dtype, name="value")(x_kv)
    q, k, v = (constrain(a, ("batch", "seq", "act_heads", "act_head_dim")) for a in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (head_dim ** -0.5)
    visible = None if key_mask is None else key_mask[:, None, None, :]
    if self.causal:
      order = jnp.tril(jnp.ones((x_q.shape[1], x_kv.shape[1]), bool))[None, None]
      visible = order if visible is None else visible & order
    if visible is not None:
      logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
      probs = jnp.where(visible, jax.nn.softmax(logits, axis=-1), 0.0)
    else:
      probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    out = constrain(out, ("batch", "seq", "act_heads", "act_head_dim"))
    return HeadsOut(width, self.dtype, name="out")(out)


def masked_mean(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Mean of x [B,L,D] over L where mask [B,L] is true (sentence-transformers pooling).

  Computed in float32; a row with no visible token gives zeros.
  """
  x = x.astype(jnp.float32)
  if mask is None:
    return jnp.mean(x, axis=1)
  weights = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
