"""The training loop, top to bottom: mesh -> data -> model -> shard -> step ->
checkpoint -> evals -> loop.

One jitted step updates the sharded train state from one global batch; the loss sees
every example of the global batch as a negative (it runs on global arrays, XLA
inserts the collectives). The state is donated, so params and optimizer state are
never held twice. Nothing here knows mesh axis names: they live in the config's rules.
"""
import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from esspr_jax import atomic_io
from esspr_jax import checkpoint as checkpoint_lib
from esspr_jax import distributed
from esspr_jax import metrics_writer as metrics_lib
from esspr_jax import optim
from esspr_jax import run_record
from esspr_jax import sharding
from esspr_jax import workdir as workdir_lib
from esspr_jax.config import validate_config
from esspr_jax.config.loss import composed_enabled, composed_rows_per_process
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.train_step import ALL_VIEWS, LossFn, TrainState, Views, train_step

log = logging.getLogger(__name__)

# (params, step) -> {metric: float}
EvalFn = Callable[[Any, int], Mapping[str, float] | None]


class NonFiniteLossError(RuntimeError):
  """The loss or gradient went NaN/inf and `config.train.skip_nonfinite` is off."""


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
def data_dir(config: ml_collections.ConfigDict, workdir) -> pathlib.Path:
  """The TFDS data dir: config.data.pipeline.data_dir, or <workdir>/tfds when empty (a
  local cache dir when the workdir is a gs:// URL: see esspr_jax/workdir.py)."""
  return workdir_lib.default_data_dir(config, workdir)


def default_train_dataset(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """This process's slice of the training data, as a Grain dataset of host batches."""
  from esspr_jax.input import pipeline  # noqa: PLC0415  (heavy, and only the default)
  return pipeline.train_dataset(config, per_process_batch_size(config),
                                data_dir=data_dir(config, workdir))


def per_process_batch_size(config) -> int:
  processes = jax.process_count()
  if config.train.batch_size % processes:
    raise ConfigError("train.batch_size", f"{config.train.batch_size} is not divisible by "
                      f"the {processes} processes")
  return config.train.batch_size // processes


def per_process_composed_batch_size(config) -> int:
  """This process's rows of the composed-query sub-batch; 0 when the term is off."""
  return composed_rows_per_process(config, jax.process_count())


def _check_batch(sample: Any, expected_rows: int, composed_rows: int = 0) -> None:
  """Every leaf has the per-process batch's rows; the `composed` sub-batch its own."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(sample):
    composed = path and getattr(path[0], "key", None) == "composed"
    want = composed_rows if composed else expected_rows
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
  from esspr_jax.losses import loss_unit, plan_terms  # noqa: PLC0415
  from esspr_jax.models import build_model  # noqa: PLC0415
  return (build_model(config.model), functools.partial(loss_unit, config=config.loss),
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


def _init_variables(model: nn.Module, rng: jax.Array, side: Any) -> Any:
  params_rng, dropout_rng = jax.random.split(rng)
  return model.init({"params": params_rng, "dropout": dropout_rng}, side)


# ----------------------------------------------------------------------------- loop
def _write_json_atomic(path, payload: Any) -> None:
  atomic_io.atomic_write(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def _host_scalars(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          model: nn.Module | None = None, loss_fn: LossFn | None = None,
          train_dataset=None, eval_fn: EvalFn | None = None,
          devices=None, views: Views | None = None) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

  `model`/`loss_fn`/`train_dataset` default to the project's (build_model, loss_unit,
  the Grain pipeline); `train_dataset` yields this process's share of each batch.
  `views` (side -> modalities the step embeds) defaults to the loss plan's with the
  default loss, and to every modality of both sides with a custom `loss_fn`.
  `eval_fn(params, step)` runs every `eval.every_steps` steps and at the end.
  """
  validate_config(config)
  tc = config.train
  eval_every = int(config.eval.get("every_steps", 0) or 0)
  workdir = workdir_lib.workdir_path(workdir)
  primary = distributed.is_primary()
  run_lock = workdir_lib.lock_run(workdir, primary)  # one workdir, one run
  run_record.reconcile_config(workdir, config, write=primary,
                              **checkpoint_lib.resume_point(workdir / "checkpoints"))

  # --- mesh
  mesh = sharding.make_mesh(tc, devices)
  logical_rules = sharding.rules(tc)
  batch_sharding = sharding.batch_sharding(mesh, logical_rules)
  shards = sharding.batch_shards(mesh, logical_rules)
  micro_batch = tc.batch_size // tc.grad_accum_steps
  if micro_batch % shards:
    raise ConfigError("train.batch_size", f"the (micro-)batch of {micro_batch} rows cannot be "
                      f"split over the {shards} batch shards of mesh {dict(mesh.shape)}")
  micro_composed = (tc.composed_batch_size // tc.grad_accum_steps
                    if composed_enabled(config) else 0)
  if micro_composed % shards:
    raise ConfigError("train.composed_batch_size", f"the composed (micro-)batch of "
                      f"{micro_composed} rows cannot be split over the {shards} batch shards "
                      f"of mesh {dict(mesh.shape)}")

  # --- data
  local_rows = per_process_batch_size(config)
  if train_dataset is None:
    train_dataset = default_train_dataset(config, workdir)
  data_iterator = iter(train_dataset)
  sample = _strip_host_only(_peek(data_iterator))
  _check_batch(sample, local_rows, per_process_composed_batch_size(config))

  # --- model
  if model is None or loss_fn is None:
    default_model, default_loss, default_views = default_model_and_loss(config)
    if loss_fn is None:
      views = views or default_views
    model, loss_fn = model or default_model, loss_fn or default_loss
  views = views or ALL_VIEWS
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  init_side = jax.tree_util.tree_map(lambda x: x[:1], sample["trigger"])
  abstract_vars = jax.eval_shape(functools.partial(_init_variables, model), init_rng,
                                 init_side)
  param_logical = sharding.logical_specs(abstract_vars["params"])
  abstract_params = nn.unbox(abstract_vars["params"])
  tx, schedule = optim.make_optimizer(tc, abstract_params, param_logical)

  # --- shard
  param_shardings = sharding.mesh_shardings(param_logical, mesh, logical_rules)
  sharding.check_divisible(abstract_params, param_shardings, param_logical)
  repl = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: repl)
  state_shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings)

  def init_state(rng, side):
    params = nn.unbox(_init_variables(model, rng, side)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with jax.set_mesh(mesh):
    abstract_state = jax.eval_shape(init_state, init_rng, init_side)
    abstract_state = checkpoint_lib.abstract_like(abstract_state, state_shardings)

    # --- step
    step_fn = jax.jit(
        functools.partial(train_step, model=model, loss_fn=loss_fn, views=views, tx=tx,
                          schedule=schedule,
                          base_rng=train_rng, logical_rules=logical_rules,
                          micro_steps=tc.grad_accum_steps),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, repl), donate_argnums=(0,))
    global_shape = lambda x: jax.ShapeDtypeStruct(
        (x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype, sharding=batch_sharding)
    abstract_batch = jax.tree_util.tree_map(global_shape, sample)
    compile_start = time.time()
    lowered = step_fn.lower(abstract_state, abstract_batch)
    compiled_step = lowered.compile()
    compile_seconds = time.time() - compile_start
    flops_per_step = metrics_lib.compiled_flops(lowered)

    # --- checkpoint
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", every=tc.checkpoint.every,
                                       keep=tc.checkpoint.keep,
                                       async_save=tc.checkpoint.async_save)
    start_step, state = ckpt.restore_latest(abstract_state, data_iterator)
    if start_step is None:
      state = jax.jit(init_state, out_shardings=state_shardings)(init_rng, init_side)
      state = _with_pretrained_towers(state, config, model, param_shardings)
    step = int(jax.device_get(state.step))
    saved_step = start_step

    writer = metrics_lib.MetricsWriter(workdir, tc.steps, enabled=primary)
    peak = metrics_lib.peak_flops_per_device(tc.peak_flops, metrics_lib.device_kind())
    writer.say(f"training {tc.steps} steps on mesh {dict(mesh.shape)} "
               f"({mesh.devices.size} {metrics_lib.device_kind()} devices), global batch "
               f"{tc.batch_size}; step compiled in {compile_seconds:.1f}s"
               + (f"; resumed at step {step}" if start_step is not None else ""))

    # --- evals
    eval_metrics = None

    def run_eval(at_step):
      nonlocal eval_metrics
      if eval_fn is None:
        return
      start = time.time()
      result = eval_fn(state.params, at_step)
      if result:
        eval_metrics = dict(result)
        writer.write(at_step, {**eval_metrics, "eval_seconds": time.time() - start}, kind="eval")

    # --- loop
    skipped = 0
    last_metrics: dict = {}
    interval_sums: dict = {}
    interval_steps = 0
    interval_start = time.time()
    seconds_per_step = 0.0
    stopped = "done"
    with checkpoint_lib.PreemptionWatch() as preemption:
      while step < tc.steps:
        host_batch = _strip_host_only(next(data_iterator))
        batch = sharding.global_batch(host_batch, batch_sharding)
        with jax.transfer_guard(tc.transfer_guard):
          state, device_metrics = compiled_step(state, batch)
        metrics = _host_scalars(device_metrics)
        step += 1
        if not metrics.pop("finite"):
          terms = {k: v for k, v in metrics.items() if k.startswith("loss")}
          if not tc.skip_nonfinite:
            ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step} (loss terms {terms}, grad_norm "
                f"{metrics['grad_norm']}); the update was not applied. Last good checkpoint: "
                f"{ckpt.last_good()}. Set config.train.skip_nonfinite=True to skip such "
                f"updates instead, or lower the learning rate.")
          skipped += 1
          log.warning("step %d: non-finite loss %s; update skipped (%d so far)", step, terms,
                      skipped)
        for k, v in metrics.items():
          interval_sums[k] = interval_sums.get(k, 0.0) + v
        interval_steps += 1

        if step % tc.log_every == 0 or step == tc.steps:
          elapsed = time.time() - interval_start
          seconds_per_step = elapsed / interval_steps
          last_metrics = {k: v / interval_steps for k, v in interval_sums.items()}
          last_metrics.update({
              "step_seconds": seconds_per_step,
              "examples_per_sec": tc.batch_size / seconds_per_step,
              "skipped_steps": skipped,
          })
          if flops_per_step:
            last_metrics["flops_per_step"] = flops_per_step
            last_metrics["tflops_per_device"] = (
                flops_per_step / seconds_per_step / mesh.devices.size / 1e12)
            last_metrics["mfu"] = metrics_lib.mfu(flops_per_step, seconds_per_step,
                                                  mesh.devices.size, peak)
          writer.write(step, last_metrics)
          writer.progress(step, last_metrics, seconds_per_step)
          interval_sums, interval_steps, interval_start = {}, 0, time.time()

        if ckpt.save(step, state, data_iterator):
          saved_step = step
          writer.flush()  # a remote workdir's metrics are uploaded at least this often
        if eval_every and step % eval_every == 0 and step < tc.steps:
          run_eval(step)
        # Every process checks (a tiny collective) after every step, so a SIGTERM seen
        # by some processes only still stops all of them after this same step.
        if preemption.agreed():
          if saved_step != step:
            ckpt.save(step, state, data_iterator, force=True)
          stopped = "preempted"
          writer.say(f"preemption signal: saved step {step} to {ckpt.path(step)}; exiting")
          break

    if stopped == "done":
      if saved_step != step:
        ckpt.save(step, state, data_iterator, force=True)
      if tc.eval_at_end or (eval_every and step % eval_every == 0):
        run_eval(step)
    ckpt.close()
    writer.close()
  if run_lock:
    run_lock.release()
  return TrainResult(step=step, state=state, stopped=stopped, resumed_from=start_step,
                     workdir=workdir,
                     checkpoint_dir=ckpt.directory, metrics_path=writer.jsonl_path,
                     last_metrics=last_metrics, eval_metrics=eval_metrics,
                     skipped_steps=skipped)
