"""A stack of transformer encoder blocks, with optional remat and scan.

Block layout (params under `layer_{i}/`, or under `layers/` when scanned):
  attn/{query,key,value}/{kernel [D,H,Dh], bias [H,Dh]}, attn/out/{kernel [H,Dh,D], bias [D]}
  norm_attn/{scale,bias} [D]
  mlp/fc_in/{kernel [D,F], bias [F]}, mlp/fc_out/{kernel [F,D], bias [D]}
  norm_mlp/{scale,bias} [D]

`norm='pre'` (ViT, fused head): x += attn(norm_attn(x)); x += mlp(norm_mlp(x)).
`norm='post'` (BERT): x = norm_attn(x + attn(x)); x = norm_mlp(x + mlp(x)).

`scan=True` stacks the blocks with `nn.scan`: one compiled block body instead of
`depth` copies (fast compiles for deep towers). Its params live under `layers/`
with the same names and a leading axis of size `depth` (logical name `layers`),
e.g. `layers/attn/query/kernel` is [depth, D, H, Dh]. `remat=True` recomputes each
block's activations in the backward pass (`nn.remat`), trading FLOPs for memory;
a policy name instead of True keeps what that `jax.checkpoint_policies` policy saves
(`model.remat_policy`; docs/performance.md has the measured trade-off).
Both give the same outputs as the plain stack. `act` is the MLP activation
(models/layers.py ACTIVATIONS); `causal=True` makes attention causal (CLIP text).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from esspr_jax.config.model import NORMS, REMAT_POLICIES
from esspr_jax.models.layers import Attention, Mlp, constrain, layer_norm


def remat_policy(remat: bool | str):
  """The `jax.checkpoint` policy for Encoder.remat: True saves nothing (recompute the
  whole block), a name from config.model.REMAT_POLICIES saves what it says."""
  name = "nothing_saveable" if remat is True else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {remat!r}")
  return getattr(jax.checkpoint_policies, name)


def remat_setting(model_config) -> bool | str:
  """What a tower passes as Encoder.remat: False, or the configured policy's name."""
  return model_config.remat and model_config.get("remat_policy", "nothing_saveable")


class EncoderBlock(nn.Module):
  """One attention + MLP block; see module doc for the layout."""
  heads: int
  mlp_dim: int
  norm: str = "pre"
  ln_eps: float = 1e-6
  dropout: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  scanned: bool = False  # return (carry, None) for nn.scan
  act: str = "gelu"
  causal: bool = False

  @nn.compact
  def __call__(self, x, key_mask: Optional[jax.Array]):
    x = constrain(x, ("batch", "seq", "act_embed"))
    attn = Attention(self.heads, dtype=self.dtype, causal=self.causal, name="attn")
    mlp = Mlp(self.mlp_dim, self.dropout, self.deterministic, dtype=self.dtype, act=self.act,
              name="mlp")
    norm_attn = layer_norm(self.ln_eps, self.dtype, "norm_attn")
    norm_mlp = layer_norm(self.ln_eps, self.dtype, "norm_mlp")
    drop = nn.Dropout(self.dropout, deterministic=self.deterministic)
    if self.norm == "pre":
      h = norm_attn(x)
      x = x + drop(attn(h, h, key_mask))
      x = x + drop(mlp(norm_mlp(x)))
    elif self.norm == "post":
      x = norm_attn(x + drop(attn(x, x, key_mask)))
      x = norm_mlp(x + drop(mlp(x)))
    else:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    x = constrain(x.astype(self.dtype), ("batch", "seq", "act_embed"))
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """`depth` EncoderBlocks; x [B,L,D], key_mask bool [B,L] or None."""
  depth: int
  heads: int
  mlp_dim: int
  norm: str = "pre"
  ln_eps: float = 1e-6
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: bool | str = False  # True: save nothing; or a REMAT_POLICIES name
  scan: bool = False
  act: str = "gelu"
  causal: bool = False

  @nn.compact
  def __call__(self, x, key_mask: Optional[jax.Array] = None, train: bool = False):
    if self.depth == 0:
      return x
    block = EncoderBlock
    if self.remat:
      block = nn.remat(block, prevent_cse=not self.scan, policy=remat_policy(self.remat))
    settings = dict(heads=self.heads, mlp_dim=self.mlp_dim, norm=self.norm, ln_eps=self.ln_eps,
                    dropout=self.dropout, deterministic=not train, dtype=self.dtype,
                    act=self.act, causal=self.causal)
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=nn.broadcast, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(**settings, scanned=True, name="layers")(x, key_mask)
      return x
    for index in range(self.depth):
      x = block(**settings, name=f"layer_{index}")(x, key_mask)
    return x


def _is_plain_stack(tree) -> bool:
  return isinstance(tree, dict) and bool(tree) and all(
      k.startswith("layer_") and k[6:].isdigit() for k in tree) and all(
          f"layer_{i}" in tree for i in range(len(tree)))


def stack_layers(params):
  """Converts a scan=False param tree (`layer_0..layer_{n-1}`) to scan=True (`layers`).

  Pure and recursive, so it works on a whole model tree; the pretrained importer
  fills the plain layout and stacks it for scanned models. Takes unboxed arrays.
  """
  if not isinstance(params, dict):
    return params
  if _is_plain_stack(params):
    blocks = [params[f"layer_{i}"] for i in range(len(params))]
    return {"layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}
  return {k: stack_layers(v) for k, v in params.items()}


def unstack_layers(params):
  """The inverse of `stack_layers`: `layers` with a leading axis -> `layer_{i}`."""
  if not isinstance(params, dict):
    return params
  if set(params) == {"layers"} and isinstance(params["layers"], dict):
    depth = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    return {f"layer_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
            for i in range(depth)}
  return {k: unstack_layers(v) for k, v in params.items()}
