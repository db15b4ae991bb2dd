"""Similarity of unit embeddings (rows normalised by esspr_jax/unit_norm.py) at the
matmul precision `config.loss.similarity_precision` asks for."""
import jax
import jax.numpy as jnp


def similarity(query: jax.Array, gallery: jax.Array, precision: str) -> jax.Array:
  """[C, E] x [B, E] -> [C, B] dot products of (already normalised) rows.

  `precision` matters on TPU/GPU, where the default float32 matmul runs in bf16
  passes: margins of 0.1 and PLC's squared gaps need more than 8 mantissa bits.
  """
  return jnp.matmul(query, gallery.T, precision=precision)
