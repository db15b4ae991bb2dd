"""The composed-query loss: (reference photo + modifier words) -> the wanted listing.

Query k is the fused view of reference photo k with modifier words k; its positive is
target k (a listing that has the change). Negatives are the other targets and, per
row, every reference photo's image-only view: the place the photo alone would search.
Those references are the hard negatives interactive search must leave ("red mug" +
"blue" must move away from red mugs), and no in-batch target stands in for them.
The reference views are constants here (stop_gradient): the term teaches the fused
head to follow the words, not the image tower to forget colours.

  loss = 1/2 (mean_k CE_k over [targets ; references] of row k of L
              + mean_j CE_j over column j of the target block),
  L = exp(min(logit_scale, max)) * cosine.
"""
import jax
import jax.numpy as jnp

from esspr_jax.losses.infonce import clipped_scale
from esspr_jax.losses.similarity import similarity


def composed_infonce(query: jax.Array, target: jax.Array, reference: jax.Array,
                     logit_scale: jax.Array, max_logit_scale: float, *,
                     precision: str = "highest") -> jax.Array:
  """query, target, reference: normalised [Bc, E]. The sub-batch is small, so scores
  are computed whole (no chunking)."""
  scale = clipped_scale(logit_scale, max_logit_scale)
  to_targets = scale * similarity(query, target, precision)
  to_references = scale * similarity(query, jax.lax.stop_gradient(reference), precision)
  positive = jnp.diagonal(to_targets)
  rows = jax.nn.logsumexp(jnp.concatenate([to_targets, to_references], axis=1), axis=1)
  cols = jax.nn.logsumexp(to_targets, axis=0)
  return 0.5 * (jnp.mean(rows - positive) + jnp.mean(cols - positive))
