"""Gradient accumulation by gradient caching (esspr_jax/train_step.py).

The whole global batch stays the negatives at any `grad_accum_steps` k, so the loss
and every param gradient must equal k=1's; checked on the tiny and the demo model,
with every loss term kind on, on 1 device and on 8-device meshes (data; data x fsdp;
fsdp), jitted with the shardings train.py gives the step. The configs have dropout 0,
which these comparisons rely on: with dropout, micro-batch j draws its masks from
fold_in(rng, j), so k changes the masks (not the objective); a separate test turns
dropout on and checks the cached gradients against plain autodiff through the same
micro-batch masks.
"""
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import model_batches  # noqa: E402

from esspr_jax import sharding, train_step  # noqa: E402
from esspr_jax.config import compose, validate_config  # noqa: E402
from esspr_jax.losses import loss_unit, plan_terms  # noqa: E402
from esspr_jax.losses.weighting import LOG_VAR  # noqa: E402
from esspr_jax.models import build_model  # noqa: E402

TOL = 1e-5
ROWS = 32  # 1 row per device per micro-batch at k=4 on 8 devices
COMPOSED_ROWS = 32


def every_term_config(preset: str, **model_overrides):
  """The preset with every loss term kind on: hinge PPM (m-m), InfoNCE (t-m), sigmoid
  (i-m), PDC, PLC (margin 0, so it is active at init), the composed-query InfoNCE."""
  config = compose(preset)
  config.loss.pairs.t_m.kind = "infonce"
  config.loss.pairs.i_m.kind = "sigmoid"
  config.loss.plc.i.margin = config.loss.plc.t.margin = 0.0
  config.loss.composed.weight = 0.1
  config.train.batch_size, config.train.composed_batch_size = ROWS, COMPOSED_ROWS
  for key, value in model_overrides.items():
    config.model[key] = value
  validate_config(config)
  return config


class Setup:
  """The model, loss, initial params and one batch of a config."""

  def __init__(self, config, rows=ROWS, composed_rows=COMPOSED_ROWS):
    self.config = config
    self.model = build_model(config.model)
    self.loss_fn = functools.partial(loss_unit, config=config.loss)
    self.views = plan_terms(config.loss).views()
    self.rules = sharding.rules(config.train)
    self.batch = jax.tree_util.tree_map(
        jnp.asarray, model_batches.make_batch(config.model, 0, rows, composed_rows))
    variables = jax.jit(self.model.init)(jax.random.key(0), self.batch["trigger"])
    self.logical = sharding.logical_specs(variables["params"])
    self.params = nn.unbox(variables["params"])

  def grads_fn(self, micro_steps, mesh=None):
    """accumulated_loss_and_grads jitted as train.py jits the step (on `mesh`)."""
    def run(params, batch, rng):
      with nn.logical_axis_rules(self.rules):
        return train_step.accumulated_loss_and_grads(
            params, batch, rng, micro_steps=micro_steps, model=self.model,
            loss_fn=self.loss_fn, views=self.views)
    if mesh is None:
      return jax.jit(run)
    param_shardings = sharding.mesh_shardings(self.logical, mesh, self.rules)
    sharding.check_divisible(self.params, param_shardings, self.logical)
    batch_sharding = sharding.batch_sharding(mesh, self.rules)
    repl = sharding.replicated(mesh)
    return jax.jit(run, in_shardings=(param_shardings, batch_sharding, repl),
                   out_shardings=(repl, repl, param_shardings))

  def run(self, micro_steps, mesh_axes=None, rng=jax.random.key(3)):
    if mesh_axes is None:
      return jax.device_get(self.grads_fn(micro_steps)(self.params, self.batch, rng))
    train = self.config.train.copy_and_resolve_references()
    train.mesh.data, train.mesh.fsdp, train.mesh.tensor = mesh_axes
    mesh = sharding.make_mesh(train)
    with jax.set_mesh(mesh):
      out = self.grads_fn(micro_steps, mesh)(self.params, self.batch, rng)
      return jax.device_get(out)


def assert_same(result, reference, tol=TOL):
  loss, terms, grads = result
  ref_loss, ref_terms, ref_grads = reference
  np.testing.assert_allclose(loss, ref_loss, rtol=tol, atol=tol)
  assert sorted(terms) == sorted(ref_terms)
  for name in terms:
    np.testing.assert_allclose(terms[name], ref_terms[name], rtol=tol, atol=tol, err_msg=name)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  ref_flat = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  assert sorted(map(str, flat)) == sorted(map(str, ref_flat))
  for path, grad in ref_flat.items():
    np.testing.assert_allclose(flat[path], grad, rtol=tol, atol=tol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def tiny():
  setup = Setup(every_term_config("tiny"))
  return setup, setup.run(1)


@pytest.fixture(scope="module")
def demo():
  setup = Setup(every_term_config("demo"))
  return setup, setup.run(1)


def test_reference_exercises_every_term_kind_and_param(tiny):
  _, (loss, terms, grads) = tiny
  assert sorted(terms) == ["infonce/composed", "infonce/t-m", "pdc/i", "pdc/t", "plc/i",
                           "plc/t", "ppm/m-m", "sigmoid/i-m"]
  assert all(float(v) > 0 for v in terms.values()), terms
  for name in ("image", "text", "fused", "logit_scale", "logit_bias"):
    assert float(sum(np.abs(g).sum() for g in jax.tree_util.tree_leaves(grads[name]))) > 0, name


@pytest.mark.parametrize("micro_steps", [2, 4])
def test_tiny_accumulation_on_one_device_equals_the_full_batch(tiny, micro_steps):
  setup, reference = tiny
  assert_same(setup.run(micro_steps), reference)


@pytest.mark.parametrize("micro_steps,mesh_axes", [(2, (8, 1, 1)), (4, (2, 4, 1))])
def test_tiny_accumulation_on_a_mesh_equals_the_full_batch(tiny, micro_steps, mesh_axes):
  """k micro-batches on a mesh equal k=1 on the same mesh (the loss's cross-device sums
  run in the same order), and k=1 on the mesh equals one device to float32 rounding."""
  setup, single_device = tiny
  reference = setup.run(1, mesh_axes)
  assert_same(setup.run(micro_steps, mesh_axes), reference)
  assert_same(reference, single_device, tol=1e-4)


@pytest.mark.parametrize("micro_steps,mesh_axes", [(2, None), (4, (8, 1, 1))])
def test_demo_accumulation_equals_the_full_batch(demo, micro_steps, mesh_axes):
  setup, reference = demo
  if mesh_axes is not None:
    reference = setup.run(1, mesh_axes)
  assert_same(setup.run(micro_steps, mesh_axes), reference)


def test_with_dropout_both_passes_share_each_micro_batch_masks():
  """Cached gradients = plain autodiff through the same per-micro-batch dropout masks
  (an independent reference: no scan, no vjp, no caching). The tiny preset's own
  (paper) terms, to keep the compile short."""
  config = compose("tiny")
  config.model.dropout = 0.2
  setup = Setup(config, rows=16, composed_rows=0)
  k = 2

  def reference(params, batch, rng):
    micro = train_step.split_micro_batches(batch, k)
    def total(p):
      parts = [train_step.embed_sides(p, jax.tree_util.tree_map(lambda x: x[j], micro),
                                      jax.random.fold_in(rng, j), model=setup.model,
                                      views=setup.views) for j in range(k)]
      sides = train_step.join_micro_batches(
          jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *parts))
      return setup.loss_fn(sides, logit_scale=p["logit_scale"], logit_bias=p["logit_bias"])
    (loss, terms), grads = jax.value_and_grad(total, has_aux=True)(params)
    return loss, terms, grads

  rng = jax.random.key(5)
  expected = jax.device_get(jax.jit(reference)(setup.params, setup.batch, rng))
  cached = setup.grads_fn(k)
  assert_same(jax.device_get(cached(setup.params, setup.batch, rng)), expected)
  other_rng = jax.device_get(cached(setup.params, setup.batch, jax.random.key(6)))
  assert abs(float(other_rng[0]) - float(expected[0])) > 1e-4  # dropout is really on


def test_micro_batches_are_strided_rows_in_original_order_and_stay_on_their_device():
  config = compose("tiny")
  mesh = sharding.make_mesh(config.train)  # data=8
  rules = sharding.rules(config.train)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  rows = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
  split = lambda x: train_step.split_micro_batches(x, 4)
  micro = np.asarray(split(rows))
  for j in range(4):
    np.testing.assert_array_equal(micro[j], rows[j::4])
  np.testing.assert_array_equal(train_step.join_micro_batches(micro), rows)

  def split_under_rules(x):
    with nn.logical_axis_rules(rules):
      return split(x)
  with jax.set_mesh(mesh):
    compiled = jax.jit(split_under_rules, in_shardings=batch_sharding).lower(
        jax.ShapeDtypeStruct(rows.shape, rows.dtype, sharding=batch_sharding)).compile()
    out = compiled(jax.device_put(rows, batch_sharding))
  hlo = compiled.as_text()
  for collective in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective
  held = {d: rows[index] for d, index in batch_sharding.devices_indices_map(rows.shape).items()}
  for shard in out.addressable_shards:  # micro-batches [4, 8, 3]: rows j::4 of each device
    np.testing.assert_array_equal(np.asarray(shard.data).swapaxes(0, 1).reshape(-1, 3),
                                  held[shard.device])


def test_rows_not_divisible_by_the_steps_is_a_clear_error():
  with pytest.raises(ValueError, match="grad_accum_steps"):
    train_step.split_micro_batches({"trigger": {"image": jnp.zeros((6, 2))}}, 4)


# ------------------------------------------------------------------ the whole step
def _standin_step(micro_steps, nan_on_marker=False, eps=1e-8):
  import optax  # noqa: PLC0415
  import standin  # noqa: PLC0415
  model = standin.StandInModel(nan_on_marker=nan_on_marker)
  tx = optax.adamw(1e-2, eps=eps)
  step = jax.jit(functools.partial(
      train_step.train_step, model=model, loss_fn=standin.standin_loss,
      views=train_step.ALL_VIEWS, tx=tx, schedule=lambda s: 1e-2, base_rng=jax.random.key(1),
      logical_rules=(), micro_steps=micro_steps))
  def state_for(batch):
    params = nn.unbox(model.init(jax.random.key(0), batch["trigger"])["params"])
    return train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params))
  return step, state_for


@pytest.mark.parametrize("micro_steps", [2, 4])
def test_train_step_update_and_metrics_do_not_depend_on_k(micro_steps):
  import standin  # noqa: PLC0415
  batch = jax.tree_util.tree_map(jnp.asarray, standin.make_batch(0, 16))
  step_1, state_for = _standin_step(1)
  step_k, _ = _standin_step(micro_steps)
  state = state_for(batch)
  (new_1, metrics_1), (new_k, metrics_k) = step_1(state, batch), step_k(state, batch)
  assert sorted(metrics_1) == sorted(metrics_k)
  assert sorted(metrics_k) == ["finite", "grad_norm", "loss", "loss/infonce/m-m",
                               "loss/infonce/t-m", "lr"]
  for name in metrics_1:
    np.testing.assert_allclose(metrics_k[name], metrics_1[name], rtol=TOL, atol=TOL,
                               err_msg=name)
  assert float(metrics_k["finite"]) == 1.0 and int(new_k.step) == 1
  changed = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new_k.params,
                                   state.params)
  assert min(jax.tree_util.tree_leaves(changed)) > 0  # every param moved
  for a, b in zip(jax.tree_util.tree_leaves(new_k.params), jax.tree_util.tree_leaves(new_1.params)):
    np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


def test_a_non_finite_micro_batch_leaves_params_and_optimizer_unchanged():
  import standin  # noqa: PLC0415
  batch = jax.tree_util.tree_map(jnp.asarray, standin.make_batch(2, 16, nan_at={2}))
  step, state_for = _standin_step(2, nan_on_marker=True)
  state = state_for(batch)
  new, metrics = step(state, batch)
  assert float(metrics["finite"]) == 0.0 and int(new.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves((new.params, new.opt_state)),
                  jax.tree_util.tree_leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_an_update_that_makes_params_non_finite_is_not_applied():
  """25.11: Adam with eps=0 divides 0 by 0 for params the batch gives no gradient (the
  unused token embeddings), while loss and gradient norm stay finite: the update's norm
  is checked as well, under the same policy."""
  import standin  # noqa: PLC0415
  batch = jax.tree_util.tree_map(jnp.asarray, standin.make_batch(0, 16))
  step, state_for = _standin_step(1, eps=0.0)
  state = state_for(batch)
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["finite"]) == 0.0 and int(new.step) == 1
  for a, b in zip(jax.tree_util.tree_leaves((new.params, new.opt_state)),
                  jax.tree_util.tree_leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ loss weighting
def weighting_setup(kind):
  """The tiny preset's (paper) terms under `kind`; 'uncertainty' with log-variances
  away from 0, so their gradients are not the trivial 1 - G_i."""
  config = compose("tiny")
  config.loss.weighting.kind = kind
  validate_config(config)
  setup = Setup(config, rows=16, composed_rows=0)
  if kind == "uncertainty":
    k = len(plan_terms(config.loss).all_terms)
    setup.params = {**setup.params, LOG_VAR: jnp.linspace(-0.5, 0.5, k)}
    setup.logical = {**setup.logical, LOG_VAR: jax.sharding.PartitionSpec()}
  return setup


@pytest.mark.parametrize("kind,mesh_axes", [("fashionbert", None), ("uncertainty", (8, 1, 1))])
def test_adaptive_weighting_under_accumulation_equals_the_full_batch(kind, mesh_axes):
  """k=2 gives k=1's loss and gradients, the log-variances' included (their gradient
  comes from the loss stage of gradient caching), also with the batch split over 8
  devices (the log-variances replicated)."""
  setup = weighting_setup(kind)
  reference = setup.run(1, mesh_axes)
  assert_same(setup.run(2, mesh_axes), reference)
  if kind != "uncertainty":
    assert LOG_VAR not in reference[2]
    return
  _, terms, grads = reference
  plan = plan_terms(setup.config.loss)
  s = np.asarray(setup.params[LOG_VAR], np.float64)
  g = np.array([t.weight * float(terms[t.name]) for t in plan.all_terms], np.float64)
  np.testing.assert_allclose(grads[LOG_VAR], 1 - np.exp(-s) * g, rtol=1e-5, atol=1e-6)


def test_log_variances_get_no_weight_decay():
  """Zero gradients, strong decay: a matrix shrinks, the log-variances stay put (decay
  would pull the learned weighting back towards 'fixed')."""
  import optax  # noqa: PLC0415
  from jax.sharding import PartitionSpec  # noqa: PLC0415
  from esspr_jax import optim  # noqa: PLC0415
  config = compose("tiny")
  config.train.optimizer.weight_decay = 0.5
  config.train.optimizer.clip_norm = 0.0
  config.train.schedule.warmup_steps = 0
  params = {"kernel": jnp.ones((2, 2)), LOG_VAR: jnp.full((3,), -0.3)}
  logical = {"kernel": PartitionSpec("embed", "mlp"), LOG_VAR: PartitionSpec()}
  tx, _ = optim.make_optimizer(config.train, params, logical)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new["kernel"][0, 0]) < 1.0
  np.testing.assert_array_equal(new[LOG_VAR], params[LOG_VAR])
