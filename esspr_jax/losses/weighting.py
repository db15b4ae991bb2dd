"""How the loss unit adds its terms up: `loss.weighting.kind`.

Each term i has a configured weight lambda_i and an unweighted value L_i; every kind
starts from the configured weighted terms G_i = lambda_i * L_i.
- 'fixed': total = sum_i G_i (the configured weights as they are).
- 'fashionbert': FashionBERT's adaptive loss (Gao et al. 2020). Weights w on the
  simplex from the terms' own values: p = softmax(G), c_i = alpha*K - p_i^2,
  w_i = (1/c_i) / sum_j (1/c_j), the minimiser of 1/2 sum_i c_i w_i^2 over the
  simplex; a larger G_i gets a larger w_i. total = K * sum_i w_i G_i, so equal
  weights (1/K) give the fixed total. w is a constant for the parameter step
  (stop_gradient), as in the paper's "fix theta, solve w; fix w, step theta".
- 'uncertainty': Kendall, Gal & Cipolla (2018), one learnable s_i = log sigma_i^2
  per term: total = sum_i exp(-s_i) G_i + s_i. s = 0 gives the fixed total.
docs/losses.md ("Weighting the terms") says why these choices.
"""
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from esspr_jax.config.loss_plan import LossPlan

# The learnable log-variances' name in the params tree (a [K] vector in the plan's
# term order); the train step hands it to the loss as the `loss_log_var` keyword.
LOG_VAR = "loss_log_var"


def fashionbert_weights(values: jax.Array, alpha: float = 1.0) -> jax.Array:
  """FashionBERT's closed-form task weights for term values `values` [K]: on the
  simplex, larger for larger values. One term gets weight 1 (nothing to balance)."""
  values = jnp.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"fashionbert_weights: values must be a [K] vector, got {values.shape}")
  k = values.shape[0]
  if k == 1:
    return jnp.ones_like(values)
  n = jax.nn.softmax(values) ** 2
  inverse = 1.0 / (alpha * k - n)
  return inverse / jnp.sum(inverse)


def uncertainty_total(values: jax.Array, log_var: jax.Array) -> jax.Array:
  """sum_i exp(-s_i) G_i + s_i: d/ds_i = 1 - exp(-s_i) G_i, zero at s_i = log G_i."""
  values, log_var = jnp.asarray(values), jnp.asarray(log_var)
  if log_var.shape != values.shape:
    raise ValueError(f"uncertainty_total: log-variances of shape {log_var.shape} for "
                     f"term values of shape {values.shape}")
  return jnp.sum(jnp.exp(-log_var) * values + log_var)


def init_loss_params(plan: LossPlan) -> Dict[str, jax.Array]:
  """The loss's own learnable params for the params tree: {LOG_VAR: zeros[K]} under
  'uncertainty' (step 0 then equals 'fixed'), nothing otherwise."""
  if plan.weighting.kind != "uncertainty":
    return {}
  return {LOG_VAR: jnp.zeros((len(plan.all_terms),), jnp.float32)}


def weighted_total(terms: Mapping[str, jax.Array], plan: LossPlan,
                   log_var: Optional[jax.Array] = None
                   ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """(total, {term: effective weight on its unweighted value}) under plan.weighting.

  The effective weight is what multiplies L_i in the total: lambda_i ('fixed'),
  K w_i lambda_i ('fashionbert'), exp(-s_i) lambda_i ('uncertainty'; the total also
  holds sum_i s_i)."""
  specs = plan.all_terms
  names = [t.name for t in specs]
  missing = [n for n in names if n not in terms]
  if missing:
    raise ValueError(f"weighted_total: no value for planned term(s) {missing}")
  lam = jnp.asarray([t.weight for t in specs], jnp.float32)
  values = jnp.stack([jnp.asarray(terms[n], jnp.float32) for n in names])
  g = lam * values
  kind = plan.weighting.kind
  if kind == "fixed":
    total, effective = jnp.sum(g), lam
  elif kind == "fashionbert":
    k = len(specs)
    w = jax.lax.stop_gradient(fashionbert_weights(g, plan.weighting.alpha))
    total, effective = k * jnp.sum(w * g), k * w * lam
  elif kind == "uncertainty":
    if log_var is None:
      raise ValueError(f"loss.weighting.kind='uncertainty' needs the learnable "
                       f"log-variances (params[{LOG_VAR!r}], passed as loss_log_var=); "
                       "the loss was called without them")
    log_var = jnp.asarray(log_var, jnp.float32)
    if log_var.shape != (len(specs),):
      raise ValueError(f"params[{LOG_VAR!r}] has shape {log_var.shape}, but the loss plan "
                       f"has {len(specs)} terms {names}")
    total = uncertainty_total(g, log_var)
    effective = jnp.exp(-jax.lax.stop_gradient(log_var)) * lam
  else:
    raise AssertionError(f"unplanned weighting kind {kind!r}")
  return total, {n: effective[i] for i, n in enumerate(names)}
