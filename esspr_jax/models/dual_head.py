"""Per-modality views of a dual encoder (CLIP, SigLIP), and `m` built on top of them.

With `model.fused.dual=True` the model computes its views the way a dual encoder does,
so a CLIP / SigLIP checkpoint retrieves zero-shot from step 0 (its `i` and `t` are the
checkpoint's own image and text embeddings):

  i = normalize(image_out(image tower's pooled vector))
  t = normalize(text_out(text tower's pooled vector))
  m = normalize(i + t + gate * fused(image tokens, text tokens))

`fused` is the ordinary fused head (models/fused.py) over both token sets; `gate` is a
scalar initialised to 0 (ReZero style), so at step 0 `m` is the normalised sum of the
two unit views (late fusion, the usual zero-shot way to search with image and title),
and training opens the gate as far as the joint head earns it. The pooled vectors are
the towers' own (CLIP: CLS after post-LN / EOS token; SigLIP: MAP head / last token).

Param tree (top-level `dual/`; E = model.embed_dim, Di / Dt = tower widths):
  dual/image_out/{kernel [Di, E], bias [E]}   CLIP visual_projection (bias 0);
                                              SigLIP: identity (it has no image projection)
  dual/text_out/{kernel [Dt, E], bias [E]}    CLIP text_projection (bias 0); SigLIP text head
  dual/gate                                   scalar, init 0
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from esspr_jax.unit_norm import l2_normalize
from esspr_jax.models.layers import compute_dtype, dense


class DualViews(nn.Module):
  """(image pooled | None, text pooled | None, fused | None) -> {'i','t','m'} subset."""
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, model_config, name: str = "dual") -> "DualViews":
    return cls(embed_dim=model_config.embed_dim, dtype=compute_dtype(model_config.dtype),
               name=name)

  @nn.compact
  def __call__(self, image_pooled: Optional[jax.Array], text_pooled: Optional[jax.Array],
               fused: Optional[jax.Array] = None) -> dict:
    out = {}
    if image_pooled is not None:
      out["i"] = l2_normalize(dense(self.embed_dim, ("embed", "proj"), self.dtype, "image_out")(
          image_pooled.astype(self.dtype)))
    if text_pooled is not None:
      out["t"] = l2_normalize(dense(self.embed_dim, ("embed", "proj"), self.dtype, "text_out")(
          text_pooled.astype(self.dtype)))
    gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()),
                      (), jnp.float32)
    if fused is not None and "i" in out and "t" in out:
      out["m"] = l2_normalize(out["i"] + out["t"] + gate * fused.astype(jnp.float32))
    return out
