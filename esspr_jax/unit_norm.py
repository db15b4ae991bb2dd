"""Row-wise L2 normalisation of embeddings, safe at zero: the one definition the model's
heads (models/fused.py, models/dual_head.py) and the losses (losses/unit.py,
losses/extra_gallery.py) share, kept below both so neither imports the other."""
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
