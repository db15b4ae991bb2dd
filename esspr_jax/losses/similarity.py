"""Cosine similarity of embeddings, safe at zero and at identical rows."""
import jax
import jax.numpy as jnp

# Norms below this are treated as this, so a zero vector maps to zero (not NaN) and
# its gradient stays finite. Squared, because the floor is applied before the sqrt.
NORM_FLOOR = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12) row-wise, in float32.

  Idempotent on already-normalised rows (the model normalises too); flooring the
  squared norm before the rsqrt keeps the gradient finite for zero rows, where
  d||x||/dx = x/||x|| would be 0/0.
  """
  x = x.astype(jnp.float32)
  sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, NORM_FLOOR**2))


def similarity(query: jax.Array, gallery: jax.Array, precision: str) -> jax.Array:
  """[C, E] x [B, E] -> [C, B] dot products of (already normalised) rows.

  `precision` matters on TPU/GPU, where the default float32 matmul runs in bf16
  passes: margins of 0.1 and PLC's squared gaps need more than 8 mantissa bits.
  """
  return jnp.matmul(query, gallery.T, precision=precision)
