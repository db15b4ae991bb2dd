"""Symmetric softmax InfoNCE (CLIP-style) with a learnable, clipped temperature.

loss = 1/2 (mean_k CE over row k of L + mean_j CE over column j of L), with
L = exp(min(logit_scale, max_logit_scale)) * S and the diagonal as targets.
The column direction is a logsumexp over query rows; in blocked form it is kept as
an online (running max, running sum) pair per gallery column, so one pass over the
row blocks gives both directions without a B x B matrix. With the rows split over
devices each device keeps that pair for its own rows, and the pairs meet in one
cross-device log-sum-exp: the global max (pmax), then the sum of the exp-sums
rescaled to it (psum) -- B numbers each, never a score.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp

from esspr_jax.losses.chunking import BlockTerm, run_block_terms
from esspr_jax.losses.hinge import positive_scores
from esspr_jax.losses.rows import WHOLE, RowShard


def clipped_scale(logit_scale: jax.Array, max_logit_scale: float) -> jax.Array:
  """exp(min(logit_scale, max)): the inverse temperature, capped (CLIP caps at 100)."""
  return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), max_logit_scale))


def infonce_term(query: Any, gallery: Any, batch: int, logit_scale: jax.Array,
                 max_logit_scale: float, *, shard: RowShard = WHOLE) -> BlockTerm:
  """Symmetric InfoNCE of the rows keyed `query` against `gallery`.

  The gallery's first `batch` rows are the positives; further rows (mined hard
  negatives) enter every query row's softmax, while the column (gallery -> query)
  direction runs over the first `batch` columns only (an extra row has no positive)."""
  scale = clipped_scale(logit_scale, max_logit_scale)

  def block(carry, scores, ids, valid):
    row_lse_sum, pos_sum, col_max, col_sum = carry
    logits = scale * scores[query]
    pos = positive_scores(logits, ids)
    row_lse = jax.nn.logsumexp(logits, axis=1)
    row_lse_sum += jnp.sum(jnp.where(valid, row_lse, 0.0))
    pos_sum += jnp.sum(jnp.where(valid, pos, 0.0))
    # Online column logsumexp. Every block has a valid row (row s < n <= B), so the
    # running max is finite after the first block. The max is only a shift for
    # stability; the lse does not depend on it, so no gradient flows through it.
    masked = jnp.where(valid[:, None], logits[:, :batch], -jnp.inf)
    new_max = jax.lax.stop_gradient(jnp.maximum(col_max, masked.max(axis=0)))
    col_sum = (col_sum * jnp.exp(col_max - new_max)
               + jnp.sum(jnp.exp(masked - new_max[None, :]), axis=0))
    return row_lse_sum, pos_sum, new_max, col_sum

  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.full((batch,), -jnp.inf, jnp.float32),
          jnp.zeros((batch,), jnp.float32))
  return BlockTerm(init, block, functools.partial(_value, shard=shard, batch=batch),
                   (query,), gallery)


def _value(carry, *, shard: RowShard, batch: int) -> jax.Array:
  row_lse_sum, pos_sum, col_max, col_sum = carry
  # Every device has a row, so its col_max is finite; the shift stays gradient-free.
  global_max = jax.lax.stop_gradient(shard.max(col_max))
  col_sum = shard.sum(col_sum * jnp.exp(col_max - global_max))
  col_lse_sum = jnp.sum(global_max + jnp.log(col_sum))
  row_lse_sum, pos_sum = shard.sum(row_lse_sum), shard.sum(pos_sum)
  # Row k's positive logit L_kk is also column k's, so one sum serves both directions.
  return 0.5 * (row_lse_sum + col_lse_sum - 2.0 * pos_sum) / batch


def infonce(query: jax.Array, gallery: jax.Array, logit_scale: jax.Array,
            max_logit_scale: float, *, chunk_size: int = 0,
            precision: str = "highest", shard: RowShard = WHOLE) -> jax.Array:
  """Symmetric InfoNCE of normalised query rows ([B, E], or this device's slice
  under `shard`) against gallery [B, E]."""
  term = infonce_term("q", "g", gallery.shape[0], logit_scale, max_logit_scale,
                      shard=shard)
  return run_block_terms({"infonce": term}, {"q": query}, {"g": gallery}, chunk_size,
                         precision, shard)["infonce"]
