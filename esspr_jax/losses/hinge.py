"""Batch hinge: the paper's PPM term, and PDC (the same hinge on trigger views).

loss = mean_k mean_j max(0, margin * [j != k] + S_kj - S_kk), S = query gallery^T:
every other gallery row must score at least `margin` below row k's own positive.
The j = k term is 0 and still counts in the mean over j (so B = 1 gives 0).
"""
from typing import Any

import jax
import jax.numpy as jnp

from esspr_jax.losses.chunking import BlockTerm, run_block_terms
from esspr_jax.losses.rows import WHOLE, RowShard


def positive_scores(scores: jax.Array, row_ids: jax.Array) -> jax.Array:
  """scores[c, row_ids[c]]: each query row's score against its own gallery row.

  Padding rows (row_ids >= B) read column B-1 instead, so that nothing out of range
  (NaN-filled) ever enters the graph; callers mask those rows.
  """
  cols = jnp.minimum(row_ids, scores.shape[1] - 1)
  return jnp.take_along_axis(scores, cols[:, None], axis=1)[:, 0]


def hinge_term(query: Any, gallery: Any, batch: int, margin: float, *,
               shard: RowShard = WHOLE, columns: int | None = None) -> BlockTerm:
  """The batch hinge of the rows keyed `query` against the gallery `gallery`.

  The gallery has `columns` rows (default `batch`): the B positives first, then extra
  rows (mined hard negatives) that are negatives for every query; the mean over j runs
  over all of them."""
  columns = batch if columns is None else columns

  def block(total, scores, ids, valid):
    scores = scores[query]
    pos = positive_scores(scores, ids)
    negative = jnp.arange(columns)[None, :] != ids[:, None]
    violation = jnp.where(negative, jax.nn.relu(margin + scores - pos[:, None]), 0.0)
    return total + jnp.sum(jnp.where(valid, violation.sum(axis=1), 0.0))

  return BlockTerm(jnp.zeros((), jnp.float32), block,
                   lambda total: shard.sum(total) / float(batch * columns), (query,), gallery)


def batch_hinge(query: jax.Array, gallery: jax.Array, margin: float, *,
                chunk_size: int = 0, precision: str = "highest",
                shard: RowShard = WHOLE) -> jax.Array:
  """Mean batch-hinge loss of normalised query rows against gallery [B, E].

  query: [B, E], or this device's [B/n, E] slice of it under `shard` (rows.py)."""
  term = hinge_term("q", "g", gallery.shape[0], margin, shard=shard)
  return run_block_terms({"hinge": term}, {"q": query}, {"g": gallery}, chunk_size,
                         precision, shard)["hinge"]
