"""Pairwise sigmoid loss (SigLIP-style) with learnable temperature and bias.

loss = -1/B sum_k sum_j log sigmoid(z_kj (t S_kj + b)), z = +1 on the diagonal and
-1 elsewhere, t = exp(min(logit_scale, max_logit_scale)). Every pair is an
independent binary decision, so there is no normalisation across the batch and the
row-blocked form is a plain sum.
"""
from typing import Any

import jax
import jax.numpy as jnp

from esspr_jax.losses.chunking import BlockTerm, run_block_terms
from esspr_jax.losses.infonce import clipped_scale
from esspr_jax.losses.rows import WHOLE, RowShard


def sigmoid_term(query: Any, gallery: Any, batch: int, logit_scale: jax.Array,
                 logit_bias: jax.Array, max_logit_scale: float, *,
                 shard: RowShard = WHOLE, columns: int | None = None) -> BlockTerm:
  """The sigmoid pair loss of the rows keyed `query` against `gallery`: its first
  `batch` rows hold the positives; any further rows (up to `columns`, mined hard
  negatives) are -1 pairs for every query."""
  columns = batch if columns is None else columns
  scale = clipped_scale(logit_scale, max_logit_scale)
  bias = jnp.asarray(logit_bias, jnp.float32)

  def block(total, scores, ids, valid):
    logits = scale * scores[query] + bias
    sign = jnp.where(jnp.arange(columns)[None, :] == ids[:, None], 1.0, -1.0)
    per_row = -jnp.sum(jax.nn.log_sigmoid(sign * logits), axis=1)
    return total + jnp.sum(jnp.where(valid, per_row, 0.0))

  return BlockTerm(jnp.zeros((), jnp.float32), block,
                   lambda total: shard.sum(total) / batch, (query,), gallery)


def sigmoid_pairs(query: jax.Array, gallery: jax.Array, logit_scale: jax.Array,
                  logit_bias: jax.Array, max_logit_scale: float, *, chunk_size: int = 0,
                  precision: str = "highest", shard: RowShard = WHOLE) -> jax.Array:
  """Sigmoid pair loss of normalised query rows ([B, E], or this device's slice
  under `shard`) against gallery [B, E]."""
  term = sigmoid_term("q", "g", gallery.shape[0], logit_scale, logit_bias,
                      max_logit_scale, shard=shard)
  return run_block_terms({"sigmoid": term}, {"q": query}, {"g": gallery}, chunk_size,
                         precision, shard)["sigmoid"]
