"""PLC, product locality consistency: a single-modality view keeps the fused
view's neighbourhood.

For trigger k, take its top-k recalls j by S = fused gallery^T; penalise
max(0, (S_kj - S'_kj)^2 - margin) with S' = single gallery^T, averaged over the k
neighbours and the batch. k larger than B is clamped to B. The neighbour choice is
a selection, not a function to differentiate: gradients flow through the scores at
the chosen neighbours only.
"""
import jax
import jax.numpy as jnp

from esspr_jax.losses.chunking import scan_row_chunks
from esspr_jax.losses.rows import WHOLE, RowShard
from esspr_jax.losses.similarity import similarity


def locality_consistency(single: jax.Array, fused: jax.Array, gallery: jax.Array,
                         margin: float, top_k: int, *, chunk_size: int = 0,
                         precision: str = "highest", shard: RowShard = WHOLE) -> jax.Array:
  """PLC of trigger views single [B, E] and fused [B, E] against recalls [B, E].

  Under `shard`, single and fused are this device's rows; their top-k runs over the
  gathered gallery's columns, so it needs no collective."""
  batch = gallery.shape[0]
  k = min(top_k, batch)

  def block(total, rows, ids, valid):
    del ids
    single_rows, fused_rows = rows
    fused_scores = similarity(fused_rows, gallery, precision)
    single_scores = similarity(single_rows, gallery, precision)
    _, neighbours = jax.lax.top_k(jax.lax.stop_gradient(fused_scores), k)
    gap = (jnp.take_along_axis(fused_scores, neighbours, axis=1)
           - jnp.take_along_axis(single_scores, neighbours, axis=1))
    per_row = jnp.mean(jax.nn.relu(gap * gap - margin), axis=1)
    return total + jnp.sum(jnp.where(valid, per_row, 0.0))

  local = scan_row_chunks(block, jnp.zeros((), jnp.float32), (single, fused), chunk_size,
                          shard)
  return shard.sum(local) / batch
