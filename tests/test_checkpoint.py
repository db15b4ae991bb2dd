"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and exits 0, round trips.

The kill tests run the trainer in a subprocess (this file, run as a script)."""
import os
import pathlib
import signal
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

STEPS = 6
ROWS = 8


def _config():
  from esspr_jax.config import compose
  config = compose("tiny")
  config.train.steps = STEPS
  config.train.batch_size = ROWS
  config.train.schedule.warmup_steps = 1
  config.train.optimizer.learning_rate = 1e-2
  config.train.log_every = 1
  config.train.checkpoint.every = 2
  return config


def _train(workdir, delay=0.0, stall_at=-1):
  import standin
  from esspr_jax import train
  dataset = standin.dataset(ROWS, delay=delay)
  if stall_at >= 0:  # the prefetch thread hangs loading this batch (marker file first)
    dataset = dataset.map_with_index(lambda i, b: _stall(workdir, i, b, stall_at))
  return train.train(_config(), workdir, model=standin.StandInModel(),
                     loss_fn=standin.standin_loss, train_dataset=dataset)


def _stall(workdir, index, batch, stall_at):
  if index == stall_at:
    (pathlib.Path(workdir) / f"loading_{index}").write_text("")
    time.sleep(600)
  return batch


def _worker(workdir: str, delay: float, stall_at: int) -> int:
  """Subprocess entry: trains; exit 0 when done or preempted (what main.py does)."""
  result = _train(workdir, delay, stall_at)
  print(f"WORKER stopped={result.stopped} step={result.step}", flush=True)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  sys.exit(_worker(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))


import json  # noqa: E402

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from esspr_jax import checkpoint  # noqa: E402
from esspr_jax.errors import ConfigError  # noqa: E402


def _start_worker(workdir, delay, stall_at=-1):
  env = dict(os.environ)
  env["PYTHONPATH"] = str(TESTS.parent) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, str(TESTS / "test_checkpoint.py"), str(workdir),
                           str(delay), str(stall_at)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _logged_steps(workdir) -> int:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  return len([1 for line in path.read_text().splitlines() if '"kind": "train"' in line])


def _wait_for(predicate, process, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    if process.poll() is not None:
      raise AssertionError(f"worker exited early:\n{process.stdout.read()}")
    if time.time() > deadline:
      process.kill()
      raise AssertionError("timed out waiting for the worker")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("uninterrupted"))


def test_sigkill_then_restart_reaches_the_same_params(tmp_path, uninterrupted):
  process = _start_worker(tmp_path, delay=0.4)
  committed = tmp_path / "checkpoints" / "2"
  # Kill once step 2 is committed and step 3 has run, i.e. mid-way between checkpoints.
  _wait_for(lambda: committed.is_dir() and _logged_steps(tmp_path) >= 3, process)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL
  killed_at = _logged_steps(tmp_path)
  assert killed_at < STEPS

  resumed = _train(tmp_path)
  assert resumed.resumed_from in (2, 4) and resumed.step == STEPS
  for name, value in resumed.state.params.items():
    np.testing.assert_array_equal(np.asarray(value),
                                  np.asarray(uninterrupted.state.params[name]), err_msg=name)
  # The metrics log shows the replayed steps: losses after the resume point are the
  # uninterrupted run's own losses for those steps.
  assert resumed.last_metrics["loss"] == pytest.approx(uninterrupted.last_metrics["loss"],
                                                       rel=1e-6)


def _saved_position(step_dir) -> dict:
  return json.loads((step_dir / checkpoint.DATA / "process_0-of-1.json").read_text())


def test_sigkill_during_prefetch_resumes_from_the_consumed_position(tmp_path, uninterrupted):
  # Batch 3 hangs in the prefetch thread: by then the thread has taken batches 0-2 from
  # the iterator (and is inside the 4th) while the step that saved checkpoint 2 had
  # consumed only 2. The checkpoint must hold position 2, or the resumed run skips
  # batches and its params differ.
  process = _start_worker(tmp_path, delay=0.0, stall_at=3)
  committed = tmp_path / "checkpoints" / "2"
  _wait_for(lambda: committed.is_dir() and (tmp_path / "loading_3").exists(), process)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert _saved_position(committed) == {"next_index": 2}

  resumed = _train(tmp_path)
  assert resumed.resumed_from == 2 and resumed.step == STEPS
  for name, value in resumed.state.params.items():
    np.testing.assert_array_equal(np.asarray(value),
                                  np.asarray(uninterrupted.state.params[name]), err_msg=name)
  for step in (4, 6):  # the resumed run's own saves: consumed positions too
    assert _saved_position(tmp_path / "checkpoints" / str(step)) == {"next_index": step}


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
  process = _start_worker(tmp_path, delay=0.4)
  _wait_for(lambda: _logged_steps(tmp_path) >= 1, process)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0, out
  assert "WORKER stopped=preempted" in out
  stopped_at = int(out.split("WORKER stopped=preempted step=")[1].split()[0])
  assert stopped_at < STEPS
  assert (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", every=2, keep=3)
  assert ckpt.latest_step() == stopped_at
  ckpt.close()


def test_round_trip_restores_state_and_data_position(tmp_path):
  dataset = grain.MapDataset.range(100).map(lambda i: {"x": np.full((2,), i, np.int32)})
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  state = {"w": jax.numpy.arange(6.0).reshape(2, 3), "step": jax.numpy.int32(3)}
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  assert ckpt.save(3, state, iterator)
  ckpt.wait()

  fresh = iter(dataset)
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = ckpt.restore(3, abstract, fresh)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert int(next(fresh)["x"][0]) == 3  # continues at the 4th element
  ckpt.close()


def test_keeps_only_the_newest_k(tmp_path):
  iterator = iter(grain.MapDataset.range(10))
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, {"v": jax.numpy.float32(step)}, iterator)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  assert ckpt.last_good() == str(tmp_path / "3")
  ckpt.close()


def test_preemption_watch_turns_sigterm_into_a_flag():
  with checkpoint.PreemptionWatch() as watch:
    assert not watch.requested
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not watch.requested and time.time() < deadline:
      time.sleep(0.01)
    assert watch.requested
    assert not watch.uses_service  # one process: the Python flag decides
    assert watch.reached(7, sync_point=False)  # on an ordinary step too
  assert signal.getsignal(signal.SIGTERM) is not watch._on_signal


def _saved_by_two_processes(tmp_path, positions):
  """A checkpoint as a 2-process run leaves it: one data position file per process."""
  dataset = grain.MapDataset.range(100).map(lambda i: {"x": np.full((2,), i, np.int32)})
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  state = {"w": jax.numpy.arange(4.0)}
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=2)
  ckpt.save(3, state, iterator)
  ckpt.wait()
  data_dir = tmp_path / "3" / checkpoint.DATA
  (data_dir / "process_0-of-1.json").unlink()
  for index, position in enumerate(positions):
    (data_dir / f"process_{index}-of-2.json").write_text(f'{{"next_index": {position}}}')
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  return ckpt, abstract, dataset


def test_resume_with_another_process_count_keeps_the_global_position(tmp_path):
  ckpt, abstract, dataset = _saved_by_two_processes(tmp_path, positions=(3, 3))
  fresh = iter(dataset)
  restored = ckpt.restore(3, abstract, fresh)  # 1 process reads a 2-process checkpoint
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
  assert int(next(fresh)["x"][0]) == 3
  ckpt.close()


def test_resume_with_another_process_count_refuses_diverging_positions(tmp_path):
  ckpt, abstract, dataset = _saved_by_two_processes(tmp_path, positions=(3, 4))
  with pytest.raises(ConfigError, match="saved by 2 processes at different data positions"):
    ckpt.restore(3, abstract, iter(dataset))
  ckpt.close()


def test_data_position_rules():
  two = {(0, 2): '{"next_index": 5}', (1, 2): '{ "next_index":5 }'}
  assert checkpoint.data_position_for({(1, 3): "a", (0, 3): "b"}, 1, 3) == "a"  # own file
  assert checkpoint.data_position_for(two, 0, 1) == two[(0, 2)]
  assert checkpoint.data_position_for(two, 3, 4) == two[(0, 2)]
  with pytest.raises(ConfigError, match=r"lacks the data position of process\(es\) \[1\]"):
    checkpoint.data_position_for({(0, 2): "x"}, 0, 1)
  with pytest.raises(ConfigError, match="no data-iterator position"):
    checkpoint.data_position_for({}, 0, 1)
  with pytest.raises(ConfigError, match=r"mixes data positions of runs with \[1, 2\]"):
    checkpoint.data_position_for({(0, 1): "x", (0, 2): "x", (1, 2): "x"}, 0, 4)


def test_uncertainty_log_variances_train_are_logged_and_resume_exactly(tmp_path):
  """The learned log-variances live in the params: they move, the metrics log each
  term's weight exp(-s_i) * lambda_i (1 at step 1: s starts at 0), the checkpoint holds
  them, and 2 steps + resume to 3 ends where 3 uninterrupted steps end. The stand-in
  model (fast to compile) under the real loss unit and the tiny preset's terms."""
  import functools
  import json

  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  import standin
  from esspr_jax import train
  from esspr_jax.config.loss_plan import plan_terms
  from esspr_jax.losses import loss_unit
  from esspr_jax.losses.weighting import LOG_VAR

  def run(steps, workdir):
    config = _config()
    config.train.steps, config.train.checkpoint.every = steps, 1
    config.loss.weighting.kind = "uncertainty"
    loss_fn = functools.partial(loss_unit, config=config.loss, with_weights=True)
    return train.train(config, workdir, model=standin.StandInModel(), loss_fn=loss_fn,
                       train_dataset=standin.dataset(ROWS))

  names = [t.name for t in plan_terms(_config().loss).all_terms]
  straight = run(3, tmp_path / "straight")
  final = np.asarray(straight.state.params[LOG_VAR])
  assert final.shape == (len(names),) and np.abs(final).min() > 0
  rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl")
          .read_text().splitlines()]
  rows = [r for r in rows if r["kind"] == "train"]
  for name in names:
    assert rows[0][f"weight/{name}"] == 1.0 and f"loss/{name}" in rows[0]
    assert rows[-1][f"weight/{name}"] != 1.0

  first = run(2, tmp_path / "resumed")
  saved = ocp.PyTreeCheckpointer().restore(tmp_path / "resumed" / "checkpoints" / "2" / "state")
  np.testing.assert_array_equal(np.asarray(saved["params"][LOG_VAR]),
                                np.asarray(first.state.params[LOG_VAR]))
  resumed = run(3, tmp_path / "resumed")
  assert resumed.resumed_from == 2
  np.testing.assert_allclose(np.asarray(resumed.state.params[LOG_VAR]), final, rtol=1e-6,
                             atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves(resumed.state.params),
                  jax.tree_util.tree_leaves(straight.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
