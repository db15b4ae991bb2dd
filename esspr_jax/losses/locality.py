"""PLC, product locality consistency: a single-modality view keeps the fused
view's neighbourhood.

For trigger k, take its top-k recalls j by S = fused gallery^T; penalise
max(0, (S_kj - S'_kj)^2 - margin) with S' = single gallery^T, averaged over the k
neighbours and the batch. k larger than B is clamped to B. The neighbour choice is
a selection, not a function to differentiate: gradients flow through the scores at
the chosen neighbours only.
"""
from typing import Any

import jax
import jax.numpy as jnp

from esspr_jax.losses.chunking import BlockTerm, run_block_terms
from esspr_jax.losses.rows import WHOLE, RowShard


def locality_term(single: Any, fused: Any, gallery: Any, batch: int, margin: float,
                  top_k: int, *, shard: RowShard = WHOLE) -> BlockTerm:
  """PLC of the rows keyed `single` and `fused` against the B-row `gallery`.

  Under `shard` the rows are this device's; their top-k runs over the whole
  gallery's columns, so it needs no collective."""
  k = min(top_k, batch)

  def block(total, scores, ids, valid):
    del ids
    fused_scores, single_scores = scores[fused], scores[single]
    _, neighbours = jax.lax.top_k(jax.lax.stop_gradient(fused_scores), k)
    gap = (jnp.take_along_axis(fused_scores, neighbours, axis=1)
           - jnp.take_along_axis(single_scores, neighbours, axis=1))
    per_row = jnp.mean(jax.nn.relu(gap * gap - margin), axis=1)
    return total + jnp.sum(jnp.where(valid, per_row, 0.0))

  return BlockTerm(jnp.zeros((), jnp.float32), block,
                   lambda total: shard.sum(total) / batch, (single, fused), gallery)


def locality_consistency(single: jax.Array, fused: jax.Array, gallery: jax.Array,
                         margin: float, top_k: int, *, chunk_size: int = 0,
                         precision: str = "highest", shard: RowShard = WHOLE) -> jax.Array:
  """PLC of trigger views single [B, E] and fused [B, E] (or this device's rows of
  them under `shard`) against recalls [B, E]."""
  term = locality_term("single", "fused", "g", gallery.shape[0], margin, top_k,
                       shard=shard)
  return run_block_terms({"plc": term}, {"single": single, "fused": fused},
                         {"g": gallery}, chunk_size, precision, shard)["plc"]
