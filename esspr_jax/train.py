"""The training loop: set up (mesh, shardings, compile) -> restore or init -> loop.

One jitted step updates the sharded train state from one global batch; the loss sees
every example of the global batch as a negative (it runs on global arrays, XLA
inserts the collectives). The state is donated, so params and optimizer state are
never held twice. Nothing here knows mesh axis names: they live in the config's rules.

The loop never waits for the devices on ordinary steps: the next global batches are
built and sent ahead in a background thread (prefetch.py), metrics are summed on the
devices and read only on log steps, checkpoints, evals and at the end
(step_metrics.py), and a preemption costs nothing until it happens
(checkpoint.PreemptionWatch). docs/training.md, "The step loop", tells the whole story.
"""
import dataclasses
import functools
import logging
import os
import pathlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from esspr_jax import batch_layout
from esspr_jax import checkpoint as checkpoint_lib
from esspr_jax import compile_report
from esspr_jax import distributed
from esspr_jax import hooks as hooks_lib
from esspr_jax import metrics_writer as metrics_lib
from esspr_jax import model_flops
from esspr_jax import optim
from esspr_jax import prefetch
from esspr_jax import run_record
from esspr_jax import sharding
from esspr_jax import step_metrics
from esspr_jax import workdir as workdir_lib
from esspr_jax.config import validate_config
from esspr_jax.config.loss import composed_enabled, composed_rows_per_process
from esspr_jax.config.loss_plan import plan_terms
from esspr_jax.losses.weighting import init_loss_params
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.models.model import EssprModel
from esspr_jax.train_step import ALL_VIEWS, LossFn, TrainState, Views, train_step

log = logging.getLogger(__name__)

EvalFn = hooks_lib.EvalFn  # (params, step) -> {metric: float}


class NonFiniteLossError(RuntimeError):
  """The loss, gradient or update went NaN/inf and `config.train.skip_nonfinite` is off."""


@dataclasses.dataclass
class TrainResult:
  step: int
  state: TrainState
  stopped: str  # 'done' or 'preempted'
  resumed_from: int | None  # the checkpoint step this run started from
  workdir: epath.Path  # local (absolute) or a gs:// URL
  checkpoint_dir: epath.Path
  metrics_path: epath.Path
  last_metrics: dict
  eval_metrics: dict | None
  skipped_steps: int


# ----------------------------------------------------------------------------- data
def default_train_dataset(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                          attach=None, source=None):
  """This process's slice of the training data, as a Grain dataset of host batches:
  the run's dataset, or `source` (pairs in the pipeline's layout) batched the same way;
  `attach` is a hook's transform that adds its side to each batch (hooks.py)."""
  from esspr_jax.input import pipeline  # noqa: PLC0415  (heavy, and only the default)
  return pipeline.train_dataset(config, per_process_batch_size(config),
                                data_dir=workdir_lib.default_data_dir(config, workdir),
                                hard_negatives=attach, source=source)


def _attach(hooks, train_dataset):
  """The one hook transform for the project's pipeline, or None."""
  attaching = [h for h in hooks if h.attach is not None]
  if len(attaching) > 1:
    raise ValueError(f"train(): {len(attaching)} hooks attach to the data feed; one may")
  if attaching and train_dataset is not None:
    raise ValueError(f"train(): {type(attaching[0]).__name__} attaches its side to the "
                     "project's training pipeline; it cannot feed a caller's train_dataset "
                     "(pass the pairs as train_source instead)")
  return attaching[0].attach if attaching else None


def _check_hooks(config, views) -> None:
  """Hard negatives on with no hook adding their side would train without them."""
  if config.train.hard_negatives.enabled and batch_layout.HARD_NEGATIVE not in views:
    raise ConfigError("train.hard_negatives.enabled", "needs the miner among train()'s "
                      "hooks (stages.training_hooks builds it)")


def per_process_batch_size(config) -> int:
  processes = jax.process_count()
  if config.train.batch_size % processes:
    raise ConfigError("train.batch_size", f"{config.train.batch_size} is not divisible by "
                      f"the {processes} processes")
  return config.train.batch_size // processes


def per_process_composed_batch_size(config) -> int:
  """This process's rows of the composed-query sub-batch; 0 when the term is off."""
  return composed_rows_per_process(config, jax.process_count())


def _check_batch(sample: Any, expected_rows: int, composed_rows: int = 0,
                 side_rows: Mapping[str, int] | None = None) -> None:
  """Every leaf has the per-process batch's rows; the `composed` sub-batch its own, a
  hook's side (the miner's 'hard_negative') batch x its `side_rows` per pair."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(sample):
    key = getattr(path[0], "key", None) if path else None
    composed = key == "composed"
    want = composed_rows if composed else expected_rows
    if side_rows and key in side_rows:
      want = expected_rows * side_rows[key]
    rows = np.shape(leaf)[0] if np.ndim(leaf) else None
    if rows != want:
      what = "composed sub-batch size" if composed else "batch size"
      raise DataError(f"training batch leaf {jax.tree_util.keystr(path)} has {rows} rows; "
                      f"expected the per-process {what} {want}")


def _peek(iterator) -> Any:
  """The iterator's next batch, leaving it where it was (shapes for compiling)."""
  position = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(position)
  return batch


def _strip_host_only(batch: Any) -> Any:
  """Drops keys the step does not use (e.g. string ids), keeping arrays only."""
  if isinstance(batch, Mapping):
    return {k: _strip_host_only(v) for k, v in batch.items()
            if not (isinstance(v, np.ndarray) and v.dtype.kind in "OSU")}
  return batch


# ----------------------------------------------------------------------------- model
def default_model_and_loss(config) -> tuple[nn.Module, LossFn, Views]:
  """The model, the loss unit, and the views its plan says the step must embed."""
  from esspr_jax.losses import loss_unit  # noqa: PLC0415
  from esspr_jax.models import build_model  # noqa: PLC0415
  return (build_model(config.model),
          functools.partial(loss_unit, config=config.loss, with_weights=True),
          plan_terms(config.loss).views())


def _with_pretrained_towers(state: "TrainState", config, model, param_shardings) -> "TrainState":
  """Loads each tower's `config.model.<tower>.init_from` checkpoint into a fresh state
  (on the host, then sharded: each device receives only its shard)."""
  from esspr_jax.models import pretrained  # noqa: PLC0415
  if isinstance(model, pretrained.PretrainedInit):
    return state  # the wrapper already put the values in at init
  towers = [t for t in pretrained.TOWER_KEYS if t in config.model
            and config.model[t].get("init_from") is not None and config.model[t].init_from.path]
  if not towers:
    return state
  params = pretrained.apply_init_from(state.params, config.model)
  log.info("loaded pretrained towers %s", towers)
  return state.replace(params=jax.device_put(params, param_shardings))


def _init_variables(model: nn.Module, rng: jax.Array, side: Any, loss_config=None) -> Any:
  """The model's variables; with `loss_config`, its params also hold the loss's own
  learnable params (weighting.init_loss_params: the uncertainty log-variances), so
  they train, checkpoint and replicate like any other param."""
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, side)
  extra = init_loss_params(plan_terms(loss_config)) if loss_config is not None else {}
  if not extra:
    return variables
  return {**variables, "params": {**variables["params"], **extra}}


# ----------------------------------------------------------------------------- set-up
@dataclasses.dataclass
class StepPlan:
  """The train step laid out on a mesh and lowered, not yet compiled: what `train()`
  compiles and runs, and what `--mode=compile` compiles for a topology it does not
  have (compile_check.py). One builder for both, so the checked program is the run's."""
  mesh: jax.sharding.Mesh
  batch_sharding: jax.sharding.NamedSharding
  param_shardings: Any
  state_shardings: TrainState
  abstract_state: TrainState  # ShapeDtypeStructs carrying the target shardings
  init: Callable[[], TrainState]  # a fresh, sharded state
  lowered: Any  # jax.stages.Lowered of (state, sums, global batch) -> (state, sums)
  zero_sums: Callable[[], step_metrics.MetricSums]
  restart_interval: Callable  # sums -> sums with the interval part zeroed (donated)


@dataclasses.dataclass
class Setup(StepPlan):
  """The plan compiled: what the loop runs, with what the compiler said about it."""
  step: Callable  # compiled (state, sums, global batch) -> (state, sums); both donated
  compile_seconds: float
  flops_per_step: float | None  # what the compiled program executes, all devices
  memory: compile_report.Memory | None  # per device, as XLA planned it


def check_mesh(config, mesh) -> None:
  """The (micro-)batch and the composed sub-batch split evenly over the batch shards."""
  tc = config.train
  shards = sharding.batch_shards(mesh, sharding.rules(tc))
  micro_composed = (tc.composed_batch_size // tc.grad_accum_steps
                    if composed_enabled(config) else 0)
  for key, rows, what in (("train.batch_size", tc.batch_size // tc.grad_accum_steps, ""),
                          ("train.composed_batch_size", micro_composed, "composed ")):
    if rows % shards:
      raise ConfigError(key, f"the {what}(micro-)batch of {rows} rows cannot be split over "
                        f"the {shards} batch shards of mesh {dict(mesh.shape)}")


def plan_step(config, model: nn.Module, loss_fn: LossFn, views: Views, global_batch: Any,
              devices=None) -> StepPlan:
  """Mesh, shardings and the lowered step for global batches shaped like
  `global_batch` (arrays or ShapeDtypeStructs); raises ConfigError on a bad layout.
  `devices` may be compile-only devices of a topology (topology.py)."""
  tc = config.train
  mesh = sharding.make_mesh(tc, devices)
  check_mesh(config, mesh)
  logical_rules = sharding.rules(tc)
  batch_sharding = sharding.batch_sharding(mesh, logical_rules)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  init_side = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), global_batch["trigger"])
  init_variables = functools.partial(_init_variables, model, loss_config=config.loss)
  abstract_vars = jax.eval_shape(init_variables, init_rng, init_side)
  param_logical = sharding.logical_specs(abstract_vars["params"])
  abstract_params = nn.unbox(abstract_vars["params"])
  tx, schedule = optim.make_optimizer(tc, abstract_params, param_logical)

  param_shardings = sharding.mesh_shardings(param_logical, mesh, logical_rules)
  sharding.check_divisible(abstract_params, param_shardings, param_logical)
  repl = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: repl)
  state_shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings)

  def init_state(rng, side):
    params = nn.unbox(init_variables(rng, side)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  one_step = functools.partial(train_step, model=model, loss_fn=loss_fn, views=views, tx=tx,
                               schedule=schedule, base_rng=train_rng,
                               logical_rules=logical_rules, micro_steps=tc.grad_accum_steps)

  def step_and_sum(state, sums, batch):
    new_state, metrics = one_step(state, batch)
    return new_state, step_metrics.add(sums, metrics, new_state.step)

  with jax.set_mesh(mesh):
    abstract_state = checkpoint_lib.abstract_like(
        jax.eval_shape(init_state, init_rng, init_side), state_shardings)
    abstract_batch = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), global_batch)
    metric_shapes = jax.eval_shape(one_step, abstract_state, abstract_batch)[1]
    zero_sums = jax.jit(lambda: step_metrics.zeros(metric_shapes), out_shardings=repl)
    lowered = jax.jit(step_and_sum, in_shardings=(state_shardings, repl, batch_sharding),
                      out_shardings=(state_shardings, repl), donate_argnums=(0, 1)).lower(
                          abstract_state, jax.eval_shape(zero_sums), abstract_batch)

  def init():
    concrete_side = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), init_side)
    return jax.jit(init_state, out_shardings=state_shardings)(init_rng, concrete_side)

  return StepPlan(mesh=mesh, batch_sharding=batch_sharding, param_shardings=param_shardings,
                  state_shardings=state_shardings, abstract_state=abstract_state, init=init,
                  lowered=lowered, zero_sums=zero_sums,
                  restart_interval=jax.jit(step_metrics.restart_interval, out_shardings=repl,
                                           donate_argnums=0))


def set_up(config, model: nn.Module, loss_fn: LossFn, views: Views, sample: Any,
           devices=None) -> Setup:
  """Mesh, shardings and the compiled step for batches shaped like `sample` (this
  process's share of one batch); raises ConfigError before compiling on a bad layout,
  and DoesNotFitError when the step needs more memory than the devices have."""
  global_batch = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(),) + x.shape[1:],
                                     x.dtype), sample)
  plan = plan_step(config, model, loss_fn, views, global_batch, devices)
  compiled, seconds = compile_report.compile_lowered(plan.lowered, config, "the train step")
  devices = plan.mesh.devices.flat
  memory = compile_report.Memory.of(compiled)
  compile_report.check_fit(memory, compile_report.device_hbm(next(iter(devices))), config,
                           "the train step")
  planned = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
  return Setup(**planned, step=compiled, compile_seconds=seconds,
               flops_per_step=metrics_lib.executable_flops(compiled, plan.mesh.devices.size),
               memory=memory)


def use_compilation_cache(config, workdir: epath.Path) -> str | None:
  """Points XLA's persistent compilation cache at `train.compilation_cache_dir`
  (config/train.py says how it defaults); returns the directory in use, or None."""
  setting = config.train.compilation_cache_dir
  if setting == "off":
    return None
  current = jax.config.jax_compilation_cache_dir
  directory = setting or current or os.fspath(workdir / "compile_cache")
  if directory != current:
    jax.config.update("jax_compilation_cache_dir", directory)
    compilation_cache.reset_cache()  # the next compile opens the new directory
  return directory


def open_workdir(config, workdir: epath.Path) -> tuple[metrics_lib.MetricsWriter, Any]:
  """Takes the workdir for this run (one workdir, one run), checks the config against
  the one it was started with (run_record.py: config.json is written once, later
  allowed changes go to config_history.jsonl) and its train dataset with the one it
  started on, and opens its metrics (process 0 writes).
  Returns the writer and the lock to release when the run ends."""
  primary = distributed.is_primary()
  lock = workdir_lib.lock_run(workdir, primary)
  try:
    resume = checkpoint_lib.resume_point(workdir / "checkpoints")
    run_record.reconcile_config(workdir, config, write=primary, **resume)
    run_record.check_dataset(workdir, run_record.dataset_identity(
        workdir_lib.default_data_dir(config, workdir), config.data.pipeline.train_dataset),
        resuming=resume["resuming"], write=primary)
  except BaseException:
    if lock:
      lock.release()
    raise
  return metrics_lib.MetricsWriter(workdir, config.train.steps, enabled=primary), lock


def restore_or_init(setup: Setup, ckpt: checkpoint_lib.Checkpointer, data_iterator, config,
                    model) -> tuple[TrainState, int | None]:
  """The newest checkpoint's state (and data position, set on `data_iterator`) laid
  out on this mesh, or a fresh state with any pretrained towers; and the step resumed
  from (None when fresh). Call inside `jax.set_mesh(setup.mesh)`."""
  start_step, state = ckpt.restore_latest(setup.abstract_state, data_iterator)
  if start_step is not None:  # the newest that restores; damaged ones are set aside
    log.info("resumed from %s", ckpt.path(start_step))
    return state, start_step
  state = _with_pretrained_towers(setup.init(), config, model, setup.param_shardings)
  return state, None


def _model_loss_views(config, model, loss_fn, views) -> tuple[nn.Module, LossFn, Views]:
  """The project's model/loss/views for whatever the caller did not give."""
  if model is None or loss_fn is None:
    default_model, default_loss, default_views = default_model_and_loss(config)
    if loss_fn is None:
      views = views or default_views
    model, loss_fn = model or default_model, loss_fn or default_loss
  return model, loss_fn, views or ALL_VIEWS


# ----------------------------------------------------------------------------- loop
def _nonfinite_error(totals: dict, last_good: str) -> NonFiniteLossError:
  values = totals["first_bad"]
  terms = {k: v for k, v in values.items() if k.startswith("loss")}
  return NonFiniteLossError(
      f"non-finite loss, gradient or update at step {totals['first_bad_step']} (loss terms "
      f"{terms}, grad_norm {values.get('grad_norm')}); the update was not applied. Last good "
      f"checkpoint: {last_good}. Set config.train.skip_nonfinite=True to skip such "
      f"updates instead, or lower the learning rate.")


def _start_line(setup: Setup, tc, start_step: int | None) -> str:
  return (f"training {tc.steps} steps on mesh {dict(setup.mesh.shape)} "
          f"({setup.mesh.devices.size} {metrics_lib.device_kind()} devices), global batch "
          f"{tc.batch_size}; step compiled in {setup.compile_seconds:.1f}s"
          + (f"; resumed at step {start_step}" if start_step is not None else ""))


def _model_flops(config, model, views) -> float | None:
  """The model FLOPs of one step (model_flops.py) when `model` is the one
  `config.model` describes; None for a caller's own model, which the config does not."""
  inner = getattr(model, "model", model)  # a PretrainedInit wrapper's model
  if not isinstance(inner, EssprModel) or inner.config != ml_collections.FrozenConfigDict(
      config.model):
    return None
  return model_flops.model_flops_per_step(config, views)


def _interval_meter(setup: Setup, tc, model_flops_per_step) -> metrics_lib.IntervalMeter:
  peak = metrics_lib.peak_flops_per_device(tc.peak_flops, metrics_lib.device_kind())
  return metrics_lib.IntervalMeter(batch_size=tc.batch_size,
                                   flops_per_step=setup.flops_per_step,
                                   model_flops_per_step=model_flops_per_step,
                                   num_devices=setup.mesh.devices.size, peak_per_device=peak)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          model: nn.Module | None = None, loss_fn: LossFn | None = None,
          train_dataset=None, train_source=None, hooks=(), eval_fn: EvalFn | None = None,
          devices=None, views: Views | None = None) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

  `model`/`loss_fn`/`train_dataset` default to the project's (build_model, loss_unit,
  the Grain pipeline); `train_dataset` yields this process's share of each batch.
  `train_source` (a sequence of pairs in the pipeline's layout, e.g. a recipe's own
  data) replaces the run's dataset but keeps the project's pipeline, so a hook can
  attach to it (the miner's hard negatives).
  `views` (side -> modalities the step embeds) defaults to the loss plan's with the
  default loss, and to every modality of both sides with a custom `loss_fn`.
  `hooks` (hooks.py) run at their steps: eval, hard-negative mining;
  stages.training_hooks builds the ones a config asks for. `eval_fn(params, step)` is
  short for an EvalHook every `eval.every_steps` steps and at the end.
  """
  validate_config(config)
  if train_dataset is not None and train_source is not None:
    raise ValueError("train(): pass train_dataset or train_source, not both")
  hooks = list(hooks)
  if eval_fn is not None:
    hooks.append(hooks_lib.EvalHook.from_config(config, eval_fn))
  workdir = workdir_lib.workdir_path(workdir)
  writer, lock = open_workdir(config, workdir)
  use_compilation_cache(config, workdir)
  try:
    return _run(config, workdir, writer, model=model, loss_fn=loss_fn,
                train_dataset=train_dataset, train_source=train_source, hooks=hooks,
                devices=devices, views=views)
  except BaseException:
    try:  # the rows written so far reach the workdir; the original error is what counts
      writer.close()
    except Exception:  # noqa: BLE001
      log.exception("closing the metrics writer after a failed run")
    raise
  finally:
    if lock:
      lock.release()


def _run(config, workdir, writer, *, model, loss_fn, train_dataset, train_source, hooks,
         devices, views) -> TrainResult:
  """train() once the workdir is this run's: data -> set-up -> restore-or-init -> loop."""
  tc = config.train
  attach = _attach(hooks, train_dataset)
  data_iterator = iter(train_dataset if train_dataset is not None
                       else default_train_dataset(config, workdir, attach, source=train_source))
  sample = _strip_host_only(_peek(data_iterator))
  _check_batch(sample, per_process_batch_size(config), per_process_composed_batch_size(config),
               {k: v for h in hooks for k, v in h.side_rows.items()})
  model, loss_fn, views = _model_loss_views(config, model, loss_fn, views)
  for hook in hooks:
    views = hook.views(views)
  _check_hooks(config, views)
  setup = set_up(config, model, loss_fn, views, sample, devices)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", every=tc.checkpoint.every,
                                     keep=tc.checkpoint.keep,
                                     async_save=tc.checkpoint.async_save)
  ctx = hooks_lib.Context(model=model, views=views, batch_sharding=setup.batch_sharding,
                          writer=writer, steps=tc.steps)
  with jax.set_mesh(setup.mesh):
    state, start_step = restore_or_init(setup, ckpt, data_iterator, config, model)
    step = saved_step = start_step or 0
    for hook in hooks:
      hook.on_start(ctx, state, step)
    writer.say(_start_line(setup, tc, start_step))
    meter = _interval_meter(setup, tc, _model_flops(config, model, views))
    sums = setup.zero_sums()
    last_metrics, skipped, stopped = {}, 0, "done"

    def read(sums) -> dict:
      """Waits for the steps so far; applies the non-finite policy to them."""
      nonlocal skipped
      totals = step_metrics.read(sums)
      if totals["first_bad_step"] >= 0 and not tc.skip_nonfinite:
        raise _nonfinite_error(totals, ckpt.last_good())
      if totals["skipped"] > skipped:
        log.warning("by step %d: %d non-finite update(s) skipped in this run (the first at "
                    "step %d)", step, totals["skipped"], totals["first_bad_step"])
      skipped = totals["skipped"]
      return totals

    build = lambda host: sharding.global_batch(_strip_host_only(host), setup.batch_sharding)
    depth = 0 if tc.sync_loop else tc.prefetch
    with checkpoint_lib.PreemptionWatch() as preemption, \
        prefetch.Prefetcher(data_iterator, build, depth) as batches:
      while step < tc.steps:
        batch, position = next(batches)
        with jax.transfer_guard(tc.transfer_guard):
          state, sums = setup.step(state, sums, batch)
        step += 1
        due = [h for h in hooks if step < tc.steps and h.due(step)]
        for hook in due:  # the miner's table must exist before this step's checkpoint
          if not hook.after_checkpoint:
            hook.run(ctx, state, step)
        log_due = step % tc.log_every == 0 or step == tc.steps
        save_due = ckpt.due(step)
        synced = tc.sync_loop or log_due or save_due or any(h.sync for h in due)
        preempted = preemption.reached(step, sync_point=synced)
        if synced or preempted:
          totals = read(sums)
        if log_due:
          last_metrics = {**meter.read(totals["sums"], totals["steps"]),
                          "skipped_steps": skipped}
          writer.write(step, last_metrics)
          writer.progress(step, last_metrics, last_metrics["step_seconds"])
          sums = setup.restart_interval(sums)
        if save_due and ckpt.save(step, state, position):
          saved_step = step
          writer.flush()  # a remote workdir's metrics are uploaded at least this often
        for hook in due:
          if hook.after_checkpoint:
            hook.run(ctx, state, step)
        if preempted:
          if saved_step != step:
            ckpt.save(step, state, position, force=True)
          stopped = "preempted"
          writer.say(f"preemption signal: saved step {step} to {ckpt.path(step)}; exiting")
          break

    if stopped == "done":
      read(sums)
      if saved_step != step:
        ckpt.save(step, state, batches.consumed, force=True)
      for hook in hooks:
        if hook.at_end(step):
          hook.run(ctx, state, step)
    ckpt.close()
    writer.close()
  evals = [h.metrics for h in hooks if isinstance(h, hooks_lib.EvalHook) and h.metrics]
  return TrainResult(step=step, state=state, stopped=stopped, resumed_from=start_step,
                     workdir=workdir, checkpoint_dir=ckpt.directory,
                     metrics_path=writer.jsonl_path, last_metrics=last_metrics,
                     eval_metrics=evals[-1] if evals else None, skipped_steps=skipped)
