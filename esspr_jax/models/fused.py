"""The fused head: one small transformer that turns tower tokens into an embedding.

It runs over [CLS?; image tokens; text tokens] and yields one L2-normalised vector.
The model calls it three times with the same params (models/model.py):
  m: image and text tokens;  t: text tokens only;  i: image tokens only.
Leaving a modality out of the sequence is the modality mask made structural: the
masked modality takes no part in the computation, so changing it cannot change the
output by a single bit, and the `t`/`i` branches cost less than a masked full-length
pass. Text padding is masked with the exact key mask of models/layers.py.

Param tree (Df = width, E = embed_dim, Di / Dt = image / text tower widths):
  image_proj/{kernel [Di, Df], bias [Df]}   with input_proj=True
  text_proj/{kernel [Dt, Df], bias [Df]}    with input_proj=True
  modality_embed [2, Df] (type, embed)      row 0 image, row 1 text; only with num_layers > 0
  cls [1, 1, Df]                            only with pool='cls'
  encoder/layer_{i}/...                     pre-LN blocks (models/encoder.py)
  final_norm/{scale,bias} [Df]              only with num_layers > 0
  map/...                                   only with pool='map' (probe, attn, norm, mlp)
  out_proj/{kernel [Df, E], bias [E]}       with output_proj=True

With num_layers=0, pool='mean' and no projections the head is exactly the
sentence-transformers recipe: L2-normalised masked mean of the tower's token states,
so an untouched pretrained text tower is the model at init.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from esspr_jax.config.model import POOLS
from esspr_jax.unit_norm import l2_normalize
from esspr_jax.models.encoder import Encoder, remat_setting
from esspr_jax.models.layers import (
    Attention, Mlp, compute_dtype, dense, layer_norm, masked_mean, normal_init)

class MapPool(nn.Module):
  """Multihead attention pooling: a learned probe attends over the visible tokens,
  followed by a residual MLP (as in big_vision's MAP head)."""
  heads: int
  mlp_dim: int
  ln_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  act: str = "gelu"

  @nn.compact
  def __call__(self, x, key_mask):
    width = x.shape[-1]
    probe = self.param("probe", normal_init((None, None, "embed")), (1, 1, width), jnp.float32)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, width)).astype(self.dtype)
    y = Attention(self.heads, dtype=self.dtype, name="attn")(probe, x, key_mask)
    y = y + Mlp(self.mlp_dim, dtype=self.dtype, act=self.act, name="mlp")(
        layer_norm(self.ln_eps, self.dtype, "norm")(y))
    return y[:, 0]


class FusedHead(nn.Module):
  """(image tokens | None, text tokens | None, text mask) -> f32[B, E], unit norm."""
  num_layers: int
  width: int
  heads: int
  mlp_dim: int
  embed_dim: int
  pool: str = "cls"
  input_proj: bool = True
  output_proj: bool = True
  ln_eps: float = 1e-6
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: bool | str = False  # Encoder.remat
  scan: bool = False

  @classmethod
  def from_config(cls, model_config, name: str = "fused") -> "FusedHead":
    f = model_config.fused
    return cls(num_layers=f.num_layers, width=f.width, heads=f.heads, mlp_dim=f.mlp_dim,
               embed_dim=model_config.embed_dim, pool=f.pool, input_proj=f.input_proj,
               output_proj=f.output_proj, ln_eps=f.ln_eps, dropout=model_config.dropout,
               dtype=compute_dtype(model_config.dtype), remat=remat_setting(model_config),
               scan=model_config.scan, name=name)

  def _modality(self, tokens, modality_embed, proj_name: str):
    x = tokens.astype(self.dtype)
    if self.input_proj:
      x = dense(self.width, ("embed", "proj"), self.dtype, proj_name)(x)
    if modality_embed is not None:  # lets attention tell the modalities apart
      x = x + modality_embed.astype(x.dtype)
    return x

  @nn.compact
  def __call__(self, image_tokens: Optional[jax.Array], text_tokens: Optional[jax.Array],
               text_mask: Optional[jax.Array], train: bool = False) -> jax.Array:
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    table = None
    if self.num_layers > 0:
      table = self.param("modality_embed", normal_init(("type", "embed")), (2, self.width),
                         jnp.float32)
    parts, masks = [], []
    if image_tokens is not None:
      parts.append(self._modality(image_tokens, None if table is None else table[0], "image_proj"))
      masks.append(jnp.ones(image_tokens.shape[:2], bool))
    if text_tokens is not None:
      parts.append(self._modality(text_tokens, None if table is None else table[1], "text_proj"))
      masks.append(text_mask.astype(bool))
    if not parts:
      raise ValueError("the fused head needs image tokens, text tokens or both")
    batch = parts[0].shape[0]
    if self.pool == "cls":
      cls = self.param("cls", normal_init((None, None, "embed")), (1, 1, self.width), jnp.float32)
      parts.insert(0, jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype))
      masks.insert(0, jnp.ones((batch, 1), bool))
    x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    mask = jnp.concatenate(masks, axis=1) if len(masks) > 1 else masks[0]
    if self.num_layers > 0:
      x = Encoder(self.num_layers, self.heads, self.mlp_dim, norm="pre", ln_eps=self.ln_eps,
                  dropout=self.dropout, dtype=self.dtype, remat=self.remat, scan=self.scan,
                  name="encoder")(x, mask, train)
      x = layer_norm(self.ln_eps, self.dtype, "final_norm")(x)
    if self.pool == "cls":
      pooled = x[:, 0]
    elif self.pool == "mean":
      pooled = masked_mean(x, mask)
    else:
      pooled = MapPool(self.heads, self.mlp_dim, self.ln_eps, self.dtype, name="map")(x, mask)
    if self.output_proj:
      pooled = dense(self.embed_dim, ("embed", "proj"), self.dtype, "out_proj")(
          pooled.astype(self.dtype))
    return l2_normalize(pooled)
