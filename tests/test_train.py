"""The training loop: non-finite handling, metrics, eval hook, optimizer pieces."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import standin  # noqa: E402

from esspr_jax import metrics_writer, optim, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402


def _config(steps, checkpoint_every=2, **train_overrides):
  config = compose("tiny")
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.schedule.warmup_steps = 1
  config.train.log_every = 1
  config.train.checkpoint.every = checkpoint_every
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def _train(config, workdir, nan_at=(), **kw):
  return train.train(config, workdir, model=standin.StandInModel(nan_on_marker=True),
                     loss_fn=standin.standin_loss, train_dataset=standin.dataset(8, nan_at),
                     **kw)


def _records(workdir, kind="train"):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ------------------------------------------------------------------ non-finite loss
def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path):
  with pytest.raises(train.NonFiniteLossError) as info:
    _train(_config(4), tmp_path, nan_at={2})  # the third batch is poisoned
  message = str(info.value)
  assert "at step 3" in message
  assert f"Last good checkpoint: {tmp_path / 'checkpoints' / '2'}" in message
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert not (tmp_path / "checkpoints" / "3").exists()


def test_nonfinite_loss_skips_update_when_configured(tmp_path):
  config = _config(3, checkpoint_every=1, skip_nonfinite=True)
  result = _train(config, tmp_path, nan_at={1})  # the second batch is poisoned
  assert result.step == 3 and result.skipped_steps == 1
  saved = {step: _saved_params(tmp_path / "checkpoints" / str(step)) for step in (1, 2, 3)}
  # The poisoned step changed nothing; the steps around it did.
  for name in saved[1]:
    np.testing.assert_array_equal(saved[2][name], saved[1][name], name)
  assert any(not np.array_equal(saved[3][n], saved[2][n]) for n in saved[1])
  assert all(np.isfinite(v).all() for v in saved[3].values())
  records = _records(tmp_path)
  assert [r["skipped_steps"] for r in records] == [0, 1, 1]
  assert records[1]["loss"] == "nan"


def test_nonfinite_loss_stops_at_the_next_log_step_naming_its_step(tmp_path):
  # The loop reads metrics only at log steps and checkpoints: the bad update (step 2)
  # is not applied, the run stops at log step 3, before checkpoint 4 can be saved.
  config = _config(8, checkpoint_every=4, log_every=3)
  with pytest.raises(train.NonFiniteLossError, match="at step 2 ") as info:
    _train(config, tmp_path, nan_at={1})
  assert "loss terms {'loss': nan" in str(info.value)
  assert f"Last good checkpoint: {tmp_path / 'checkpoints' / '1'}" in str(info.value)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  assert _records(tmp_path) == []


def _saved_params(step_dir):
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(step_dir / "state")
  return {k: np.asarray(v) for k, v in restored["params"].items()}


# ------------------------------------------------------------------ metrics and evals
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("logged")
  calls = []

  def eval_fn(params, step):
    calls.append(step)
    return {"param_sum": float(sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(params)))}

  config = _config(4, log_every=2, peak_flops=1e12)
  config.eval.every_steps = 2
  result = _train(config, workdir, eval_fn=eval_fn)
  return workdir, result, calls


def test_metrics_name_every_loss_term_and_rates(logged_run):
  workdir, result, _ = logged_run
  records = _records(workdir)
  assert [r["step"] for r in records] == [2, 4]
  for key in ("loss", "loss/infonce/m-m", "loss/infonce/t-m", "lr", "grad_norm",
              "examples_per_sec", "step_seconds", "flops_per_step", "hfu"):
    assert key in records[-1], key
  # The stand-in model is not the one config.model describes: no model FLOPs, no MFU.
  assert "mfu" not in records[-1] and "model_flops_per_step" not in records[-1]
  last = records[-1]
  assert last["loss"] == pytest.approx(last["loss/infonce/m-m"] + last["loss/infonce/t-m"],
                                       rel=1e-5)
  assert last["examples_per_sec"] == pytest.approx(8 / last["step_seconds"], rel=1e-6)
  assert last["hfu"] == pytest.approx(
      last["flops_per_step"] / last["step_seconds"] / (8 * 1e12), rel=1e-6)
  # Step 4's lr (logged as the mean over steps 3-4) follows the schedule.
  schedule = optim.learning_rate_schedule(_config(4).train)
  assert last["lr"] == pytest.approx((float(schedule(2)) + float(schedule(3))) / 2, rel=1e-5)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_sync_loop_trains_the_same_steps(logged_run, tmp_path):
  # The synchronous loop (train.sync_loop, kept for benchmarks/bench_loop.py) and the
  # asynchronous one are the same computation on the same batches.
  workdir, result, _ = logged_run
  config = _config(4, log_every=2, peak_flops=1e12, sync_loop=True)
  config.eval.every_steps = 2
  sync = _train(config, tmp_path)
  for name, value in sync.state.params.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(result.state.params[name]))
  assert [r["loss"] for r in _records(tmp_path)] == [r["loss"] for r in _records(workdir)]


def test_checkpoints_hold_the_data_position_of_the_consumed_batches(logged_run):
  # The prefetch thread runs ahead of the step; the saved position must not.
  workdir, _, _ = logged_run
  for step in (2, 4):
    text = (workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text()
    assert json.loads(text) == {"next_index": step}


def test_eval_hook_runs_periodically_and_at_the_end(logged_run):
  workdir, result, calls = logged_run
  assert calls == [2, 4]
  evals = _records(workdir, "eval")
  assert [r["step"] for r in evals] == [2, 4]
  expected = float(sum(np.sum(np.asarray(p)) for p in jax.tree_util.tree_leaves(
      result.state.params)))
  assert evals[-1]["param_sum"] == pytest.approx(expected, rel=1e-5)
  assert result.eval_metrics["param_sum"] == evals[-1]["param_sum"]


# Gradient accumulation (gradient caching: equal to the full batch at any k) is tested in
# tests/test_train_step.py.


# ------------------------------------------------------------------ optimizer pieces
def test_decay_mask_spares_norms_biases_embeddings_and_logit_scale():
  params = {"dense": {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)},
            "ln": {"scale": np.zeros(4)}, "tok": {"embedding": np.zeros((10, 4))},
            "pos_table": np.zeros((8, 4)), "logit_scale": np.zeros(()),
            "proj": np.zeros((4, 2))}
  specs = {"dense": {"kernel": P("embed", "mlp"), "bias": P("mlp")}, "ln": {"scale": P("embed")},
           "tok": {"embedding": P("vocab", "embed")}, "pos_table": P("pos", "embed"),
           "logit_scale": P(), "proj": P("embed", "proj")}
  o = compose("tiny").train.optimizer
  mask = optim.decay_mask(params, specs, o.no_decay_names, o.no_decay_axes)
  assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False},
                  "tok": {"embedding": False}, "pos_table": False, "logit_scale": False,
                  "proj": True}


def test_weight_decay_applies_only_where_the_mask_says():
  config = compose("tiny").train
  config.optimizer.clip_norm = 0.0
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  specs = {"kernel": P(None, None), "bias": P(None)}
  tx, schedule = optim.make_optimizer(config, params, specs)
  state = tx.init(params)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  for _ in range(3):  # past warmup so the lr is not zero
    updates, state = tx.update(zero, state, params)
  assert float(jnp.abs(updates["bias"]).max()) == 0.0
  lr = float(schedule(2))
  np.testing.assert_allclose(updates["kernel"], -lr * config.optimizer.weight_decay, rtol=1e-6)


def test_schedule_warms_up_then_decays_to_the_end_ratio():
  config = compose("tiny").train
  config.steps, config.schedule.warmup_steps = 100, 10
  config.schedule.end_lr_ratio = 0.1
  peak = config.optimizer.learning_rate
  schedule = optim.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(peak / 2)
  assert float(schedule(10)) == pytest.approx(peak)
  # cosine half-way between warmup end and the last step: mean of peak and end.
  assert float(schedule(55)) == pytest.approx((peak + 0.1 * peak) / 2, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(0.1 * peak)


# ------------------------------------------------------------------ metrics helpers
def test_utilisation_and_peak_and_hbm_lookup():
  from esspr_jax import hardware
  assert metrics_writer.utilisation(2e12, 0.5, 4, 1e12) == pytest.approx(1.0)
  assert metrics_writer.utilisation(1e12, 1.0, 1, None) is None
  assert metrics_writer.peak_flops_per_device(0, "TPU v4") == 275e12
  assert metrics_writer.peak_flops_per_device(5.0, "TPU v4") == 5.0
  assert metrics_writer.peak_flops_per_device(0, "cpu") is None
  assert hardware.lookup(hardware.HBM_BYTES_BY_DEVICE_KIND, "TPU v5 lite") == int(15.75 * 2**30)
  assert hardware.lookup(hardware.HBM_BYTES_BY_DEVICE_KIND, "TPU v5 litepod") == int(
      15.75 * 2**30)  # by prefix
  assert hardware.lookup(hardware.HBM_BYTES_BY_DEVICE_KIND, "cpu") is None


def test_interval_meter_averages_sums_and_times_the_interval():
  clock = iter([10.0, 14.0, 15.0]).__next__
  meter = metrics_writer.IntervalMeter(batch_size=8, flops_per_step=2e12, num_devices=4,
                                       peak_per_device=1e12, clock=clock)
  row = meter.read({"loss": 6.0, "lr": 0.4}, steps=4)  # 4 steps in 4 s
  assert row == pytest.approx({"loss": 1.5, "lr": 0.1, "step_seconds": 1.0,
                               "examples_per_sec": 8.0, "flops_per_step": 2e12,
                               "tflops_per_device": 0.5, "hfu": 0.5})
  row = meter.read({"loss": 1.0}, steps=2)  # the next interval: 2 steps in 1 s
  assert row["step_seconds"] == 0.5 and row["loss"] == 0.5 and row["hfu"] == 1.0
  empty = metrics_writer.interval_metrics(
      {}, 1, 1.0, batch_size=1, flops_per_step=None, num_devices=1, peak_per_device=None)
  assert "mfu" not in empty and "hfu" not in empty


def test_mfu_counts_model_flops_and_hfu_the_executed_ones():
  # Remat and gradient caching run more FLOPs than the model needs: HFU sees them,
  # MFU does not.
  meter = metrics_writer.IntervalMeter(batch_size=8, flops_per_step=3e12, num_devices=4,
                                       peak_per_device=1e12, model_flops_per_step=2e12,
                                       clock=iter([0.0, 1.0]).__next__)
  row = meter.read({}, steps=1)
  assert row["mfu"] == pytest.approx(0.5) and row["hfu"] == pytest.approx(0.75)
  assert row["model_flops_per_step"] == 2e12 and row["flops_per_step"] == 3e12


def test_step_metrics_sum_on_device_and_keep_the_first_bad_step():
  from esspr_jax import step_metrics
  steps = [{"loss": 1.0, "grad_norm": 2.0, "finite": 1.0},
           {"loss": float("nan"), "grad_norm": 5.0, "finite": 0.0},
           {"loss": 3.0, "grad_norm": 4.0, "finite": 1.0},
           {"loss": float("inf"), "grad_norm": 1.0, "finite": 0.0}]
  as_device = lambda m: {k: jnp.float32(v) for k, v in m.items()}
  add = jax.jit(step_metrics.add)
  acc = step_metrics.zeros(as_device(steps[0]))
  for number, metrics in enumerate(steps[:3], start=1):
    acc = add(acc, as_device(metrics), number)
  totals = step_metrics.read(acc)
  assert totals["steps"] == 3 and totals["skipped"] == 1 and totals["first_bad_step"] == 2
  assert totals["sums"]["grad_norm"] == 11.0 and np.isnan(totals["sums"]["loss"])
  assert np.isnan(totals["first_bad"]["loss"]) and totals["first_bad"]["grad_norm"] == 5.0
  acc = add(step_metrics.restart_interval(acc), as_device(steps[3]), 4)
  totals = step_metrics.read(acc)
  assert totals["steps"] == 1 and totals["sums"]["grad_norm"] == 1.0
  assert totals["skipped"] == 2 and totals["first_bad_step"] == 2  # the run's record stays
  assert set(totals["sums"]) == {"loss", "grad_norm"}


def test_progress_line_has_eta():
  line = metrics_writer.progress_line(25, 100, {"loss": 1.5, "lr": 1e-3}, 2.0)
  assert line.startswith("step 25/100 (25%) | eta 2:30")
  assert "loss 1.5" in line


def test_a_run_that_fails_in_set_up_closes_its_metrics_writer_and_lock(tmp_path, monkeypatch):
  closed = []
  real_close = metrics_writer.MetricsWriter.close
  monkeypatch.setattr(metrics_writer.MetricsWriter, "close",
                      lambda self: closed.append(True) or real_close(self))
  config = _config(steps=2)
  with pytest.raises(Exception, match="batch"):  # 4-row batches for a batch of 8
    train.train(config, tmp_path, model=standin.StandInModel(), loss_fn=standin.standin_loss,
                train_dataset=standin.dataset(4))
  assert closed == [True]
  assert _train(config, tmp_path).step == 2  # the workdir lock was released too
