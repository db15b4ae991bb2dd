"""Pairwise sigmoid loss (SigLIP-style) with learnable temperature and bias.

loss = -1/B sum_k sum_j log sigmoid(z_kj (t S_kj + b)), z = +1 on the diagonal and
-1 elsewhere, t = exp(min(logit_scale, max_logit_scale)). Every pair is an
independent binary decision, so there is no normalisation across the batch and the
row-blocked form is a plain sum.
"""
import jax
import jax.numpy as jnp

from esspr_jax.losses.chunking import scan_row_chunks
from esspr_jax.losses.infonce import clipped_scale
from esspr_jax.losses.rows import WHOLE, RowShard
from esspr_jax.losses.similarity import similarity


def sigmoid_pairs(query: jax.Array, gallery: jax.Array, logit_scale: jax.Array,
                  logit_bias: jax.Array, max_logit_scale: float, *, chunk_size: int = 0,
                  precision: str = "highest", shard: RowShard = WHOLE) -> jax.Array:
  """Sigmoid pair loss of normalised query rows ([B, E], or this device's slice
  under `shard`) against gallery [B, E]."""
  batch = gallery.shape[0]
  scale = clipped_scale(logit_scale, max_logit_scale)
  bias = jnp.asarray(logit_bias, jnp.float32)

  def block(total, q, ids, valid):
    logits = scale * similarity(q, gallery, precision) + bias
    sign = jnp.where(jnp.arange(batch)[None, :] == ids[:, None], 1.0, -1.0)
    per_row = -jnp.sum(jax.nn.log_sigmoid(sign * logits), axis=1)
    return total + jnp.sum(jnp.where(valid, per_row, 0.0))

  local = scan_row_chunks(block, jnp.zeros((), jnp.float32), query, chunk_size,
                          shard)
  return shard.sum(local) / batch
