"""loss.weighting (esspr_jax/losses/weighting.py) against float64 numpy references: the
FashionBERT closed form vs a direct solve of its KKT system and vs the product formula,
uncertainty weighting vs hand computation, their gradients, and config errors."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esspr_jax.config import compose, validate_config
from esspr_jax.config import loss as loss_section
from esspr_jax.config.loss_plan import plan_terms
from esspr_jax.errors import ConfigError
from esspr_jax.losses import loss_unit
from esspr_jax.losses.weighting import (LOG_VAR, fashionbert_weights, init_loss_params,
                                        uncertainty_total, weighted_total)

TOL = 1e-6


def ref_softmax(g):
  e = np.exp(g - g.max())
  return e / e.sum()


def ref_kkt_weights(g, alpha):
  """argmin_w 1/2 sum_i c_i w_i^2 s.t. sum_i w_i = 1 (w >= 0 inactive for c > 0), by
  solving the KKT system [diag(c) -1; 1^T 0] [w; lambda] = [0; 1] directly."""
  k = len(g)
  c = alpha * k - ref_softmax(np.asarray(g, np.float64)) ** 2
  system = np.zeros((k + 1, k + 1))
  system[:k, :k] = np.diag(c)
  system[:k, k] = -1.0
  system[k, :k] = 1.0
  rhs = np.zeros(k + 1)
  rhs[k] = 1.0
  return np.linalg.solve(system, rhs)[:k], c


def ref_product_weights(g, alpha):
  k = len(g)
  c = alpha * k - ref_softmax(np.asarray(g, np.float64)) ** 2
  prods = np.array([np.prod(np.delete(c, i)) for i in range(k)])
  return prods / prods.sum()


@pytest.mark.parametrize("k,alpha,scale", [(2, 1.0, 1.0), (3, 0.5, 3.0), (7, 1.0, 0.2),
                                           (5, 2.0, 5.0)])
def test_fashionbert_weights_solve_the_kkt_system(k, alpha, scale):
  g = np.random.default_rng(k).uniform(0, scale, k)
  want, c = ref_kkt_weights(g, alpha)
  got = np.asarray(fashionbert_weights(jnp.asarray(g, jnp.float32), alpha), np.float64)
  np.testing.assert_allclose(got, want, atol=TOL)
  np.testing.assert_allclose(got, ref_product_weights(g, alpha), atol=TOL)
  assert abs(got.sum() - 1) < TOL and (got > 0).all()
  # the minimiser: no point of the simplex has a lower objective
  points = np.random.default_rng(0).dirichlet(np.ones(k), 2000)
  assert (0.5 * (points ** 2 * c).sum(1) >= 0.5 * (want ** 2 * c).sum() - 1e-12).all()
  # a larger loss gets a larger weight
  order = np.argsort(g)
  assert (np.diff(got[order]) > 0).all()


def test_fashionbert_weights_edge_cases():
  np.testing.assert_allclose(fashionbert_weights(jnp.asarray([0.7]), 1.0), [1.0])
  np.testing.assert_allclose(fashionbert_weights(jnp.full((4,), 0.3), 1.0), [0.25] * 4,
                             atol=TOL)
  with pytest.raises(ValueError, match=r"\[K\] vector"):
    fashionbert_weights(jnp.zeros((2, 2)))


def test_uncertainty_total_and_its_gradient_by_hand():
  g = np.array([0.4, 1.5, 0.05], np.float64)
  s = np.array([0.0, 0.7, -1.2], np.float64)
  want = float(np.sum(np.exp(-s) * g + s))
  total, (dg, ds) = jax.value_and_grad(uncertainty_total, argnums=(0, 1))(
      jnp.asarray(g, jnp.float32), jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(total, want, rtol=TOL)
  np.testing.assert_allclose(ds, 1 - np.exp(-s) * g, rtol=1e-5, atol=TOL)
  np.testing.assert_allclose(dg, np.exp(-s), rtol=1e-5)
  np.testing.assert_allclose(uncertainty_total(jnp.asarray(g), jnp.zeros(3)), g.sum(),
                             rtol=TOL)
  with pytest.raises(ValueError, match="shape"):
    uncertainty_total(jnp.zeros(3), jnp.zeros(2))


def plan_with(kind, alpha=1.0, preset="tiny"):
  loss = compose(preset).loss
  loss.weighting.kind, loss.weighting.alpha = kind, alpha
  return plan_terms(loss)


def term_values(plan, seed=0):
  rng = np.random.default_rng(seed)
  return {t.name: jnp.float32(rng.uniform(0.01, 1.0)) for t in plan.all_terms}


def test_fixed_is_the_configured_weighted_sum():
  plan = plan_with("fixed")
  terms = term_values(plan)
  total, weights = weighted_total(terms, plan)
  want = sum(t.weight * float(terms[t.name]) for t in plan.all_terms)
  np.testing.assert_allclose(total, want, rtol=TOL)
  assert weights == {t.name: pytest.approx(t.weight) for t in plan.all_terms}


def test_fashionbert_total_reference_and_equal_weights_give_the_fixed_total():
  loss = compose("tiny").loss
  loss.pdc.t.weight, loss.plc.i.weight = 0.5, 3.0  # configured weights that are not 1
  loss.weighting.kind = "fashionbert"
  plan = plan_terms(loss)
  k = len(plan.all_terms)
  terms = term_values(plan)
  lam = np.array([t.weight for t in plan.all_terms])
  g = lam * np.array([float(terms[t.name]) for t in plan.all_terms])
  w, _ = ref_kkt_weights(g, 1.0)
  total, weights = weighted_total(terms, plan)
  np.testing.assert_allclose(total, k * (w * g).sum(), rtol=1e-5)
  np.testing.assert_allclose([weights[t.name] for t in plan.all_terms], k * w * lam,
                             rtol=1e-5)
  # equal G_i -> w_i = 1/K -> exactly the fixed total
  equal = {t.name: jnp.float32(0.6 / t.weight) for t in plan.all_terms}
  loss.weighting.kind = "fixed"
  fixed_total, _ = weighted_total(equal, plan_terms(loss))
  np.testing.assert_allclose(weighted_total(equal, plan)[0], 0.6 * k, rtol=TOL)
  np.testing.assert_allclose(fixed_total, 0.6 * k, rtol=TOL)


def test_fashionbert_weights_get_no_gradient():
  """d total / d L_i = K w_i lambda_i: w is a constant for the parameter step."""
  plan = plan_with("fashionbert")
  k = len(plan.all_terms)
  terms = term_values(plan, seed=3)
  grads = jax.grad(lambda t: weighted_total(t, plan)[0])(terms)
  g = np.array([t.weight * float(terms[t.name]) for t in plan.all_terms])
  w, _ = ref_kkt_weights(g, 1.0)
  np.testing.assert_allclose([grads[t.name] for t in plan.all_terms],
                             k * w * [t.weight for t in plan.all_terms], rtol=1e-5)
  # without the stop the gradient differs (so the test can tell)
  through = jax.grad(lambda gg: k * jnp.sum(fashionbert_weights(gg) * gg))(jnp.asarray(g))
  assert np.abs(np.asarray(through) - k * w).max() > 1e-3


def test_uncertainty_weighted_total_and_log_var_gradient():
  plan = plan_with("uncertainty")
  k = len(plan.all_terms)
  params = init_loss_params(plan)
  assert set(params) == {LOG_VAR} and params[LOG_VAR].shape == (k,)
  terms = term_values(plan, seed=1)
  g = np.array([t.weight * float(terms[t.name]) for t in plan.all_terms])
  fixed_total, _ = weighted_total(terms, plan_with("fixed"))
  np.testing.assert_allclose(weighted_total(terms, plan, params[LOG_VAR])[0], fixed_total,
                             rtol=TOL)  # s = 0 is the fixed total
  s = np.linspace(-1, 1, k)
  total, weights = weighted_total(terms, plan, jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(total, np.sum(np.exp(-s) * g + s), rtol=1e-5)
  np.testing.assert_allclose([weights[t.name] for t in plan.all_terms],
                             np.exp(-s) * [t.weight for t in plan.all_terms], rtol=1e-5)
  ds = jax.grad(lambda v: weighted_total(terms, plan, v)[0])(jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(ds, 1 - np.exp(-s) * g, rtol=1e-5, atol=TOL)
  with pytest.raises(ValueError, match="log-variances"):
    weighted_total(terms, plan)
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    weighted_total(terms, plan, jnp.zeros(2))
  assert init_loss_params(plan_with("fashionbert")) == {}


def test_loss_unit_uses_the_weighting_and_reports_weights():
  plan = plan_with("fixed")
  rng = np.random.default_rng(0)
  sides = {side: {m: jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) for m in "itm"}
           for side in ("trigger", "recall")}
  fixed = compose("tiny").loss
  total, terms = loss_unit(sides, fixed)
  assert sorted(terms) == sorted(t.name for t in plan.all_terms)  # no weights by default
  _, with_weights = loss_unit(sides, fixed, with_weights=True)
  assert {n for n in with_weights if n.startswith("weight/")} == {
      f"weight/{t.name}" for t in plan.all_terms}
  uncertainty = compose("tiny").loss
  uncertainty.weighting.kind = "uncertainty"
  k = len(plan.all_terms)
  u_total, _ = loss_unit(sides, uncertainty, loss_log_var=jnp.zeros(k))
  np.testing.assert_allclose(u_total, total, rtol=TOL)
  s = jnp.full((k,), 0.5)
  want = sum(float(terms[t.name]) * t.weight for t in plan.all_terms) * np.exp(-0.5) + 0.5 * k
  np.testing.assert_allclose(loss_unit(sides, uncertainty, loss_log_var=s)[0], want,
                             rtol=1e-5)
  fb = compose("tiny").loss
  fb.weighting.kind = "fashionbert"
  fb_total, fb_terms = loss_unit(sides, fb, with_weights=True)
  np.testing.assert_allclose(
      fb_total, sum(float(fb_terms[f"weight/{n}"]) * float(terms[n]) for n in terms),
      rtol=1e-5)


@pytest.mark.parametrize("setting,key,match", [
    ({"kind": "pareto"}, "loss.weighting.kind", "must be one of"),
    ({"alfa": 1.0}, "loss.weighting.alfa", "unknown key"),
    ({"alpha": -1.0}, "loss.weighting.alpha", ">= 0"),
    ({"alpha": "big"}, "loss.weighting.alpha", "a number"),
    ({"kind": "fashionbert", "alpha": 0.1}, "loss.weighting.alpha", "1/K"),
])
def test_bad_weighting_config_names_the_key(setting, key, match):
  loss = compose("tiny").loss.to_dict()  # a plain dict: ConfigDict would refuse a str
  loss["weighting"].update(setting)
  with pytest.raises(ConfigError, match=match) as info:
    plan_terms(loss)
  assert info.value.key == key
  if setting.get("kind") == "pareto":
    config = compose("tiny")
    config.loss.weighting.kind = "pareto"
    with pytest.raises(ConfigError, match="loss.weighting.kind"):
      validate_config(config)


def test_defaults_and_a_missing_section_are_fixed():
  config = compose("demo")
  validate_config(config)
  assert plan_terms(config.loss).weighting.kind == "fixed"
  assert config.loss.weighting.alpha == 1.0
  loss = config.loss.to_dict()
  del loss["weighting"]
  assert plan_terms(loss).weighting.kind == "fixed"


def test_one_term_adaptive_weighting_is_allowed_and_warns_once(caplog):
  config = compose("tiny")
  for pair in ("t_m", "i_m"):
    config.loss.pairs[pair].weight = 0.0
  for section in ("pdc", "plc"):
    for view in ("t", "i"):
      config.loss[section][view].weight = 0.0
  config.loss.weighting.kind = "fashionbert"
  loss_section._WARNED_ONE_TERM.clear()
  with caplog.at_level(logging.WARNING, logger="esspr_jax.config.loss"):
    validate_config(config)
    validate_config(config)
  warnings = [r for r in caplog.records if "nothing to balance" in r.getMessage()]
  assert len(warnings) == 1 and "ppm/m-m" in warnings[0].getMessage()
  terms = {"ppm/m-m": jnp.float32(0.3)}
  np.testing.assert_allclose(weighted_total(terms, plan_terms(config.loss))[0], 0.3, rtol=TOL)
