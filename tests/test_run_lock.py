"""One workdir, one run: the workdir lock (esspr_jax/workdir.py), local and gs://.

A second run on a locked workdir is refused with a ConfigError naming the owner (main
exits 2 on it); a lock left by a run killed with SIGKILL is recovered: a local flock at
once (the kernel drops it with the process), a gs:// lease once it expires.
"""
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import standin  # noqa: E402

from esspr_jax import train, workdir as workdir_lib  # noqa: E402
from esspr_jax.config import compose  # noqa: E402
from esspr_jax.errors import ConfigError  # noqa: E402

_HOLDER = """
import sys, time
from esspr_jax import workdir
lock = workdir.RunLock.acquire(sys.argv[1], lease_s=float(sys.argv[2]))
print("LOCKED", flush=True)
time.sleep(600)
"""


def _hold(workdir, lease_s=60.0):
  """A process holding the workdir's lock (until killed)."""
  env = dict(os.environ, PYTHONPATH=str(TESTS.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", FSSPEC_GCS_TOKEN="anon")
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), str(lease_s)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  line = holder.stdout.readline()
  assert line.strip() == "LOCKED", line + holder.stdout.read()
  return holder


def _kill(holder):
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)


def _config(steps=2):
  config = compose("tiny")
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.schedule.warmup_steps = 1
  config.train.checkpoint.every = 2
  return config


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_owner(tmp_path):
  holder = _hold(tmp_path)
  try:
    with pytest.raises(workdir_lib.WorkdirBusy) as info:
      train.train(_config(), tmp_path, model=standin.StandInModel(),
                  loss_fn=standin.standin_loss, train_dataset=standin.dataset(8))
    assert isinstance(info.value, ConfigError)  # main.py: exit 2, one line
    assert f"pid {holder.pid}" in str(info.value) and "in use by another run" in str(info.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
  finally:
    _kill(holder)


def test_a_lock_left_by_a_killed_run_is_recovered_at_once(tmp_path, caplog):
  holder = _hold(tmp_path)
  _kill(holder)
  with caplog.at_level(logging.WARNING, logger="esspr_jax.workdir"):
    lock = workdir_lib.lock_run(tmp_path)
  assert lock.lock.stale_owner["pid"] == holder.pid
  assert f"pid {holder.pid}" in caplog.text  # says whose stale lock it took over
  lock.release()
  _kill(_hold(tmp_path))  # released: another process can take it now


def test_the_lock_nests_within_one_process_and_frees_on_the_last_release(tmp_path):
  outer = workdir_lib.RunLock.acquire(tmp_path)
  inner = workdir_lib.RunLock.acquire(tmp_path)
  inner.release()
  assert (tmp_path / workdir_lib.LOCK_NAME).read_text()  # still held, owner recorded
  outer.release()
  assert (tmp_path / workdir_lib.LOCK_NAME).read_text() == ""  # released cleanly
  _kill(_hold(tmp_path))


# ------------------------------------------------------------------ gs://
from test_gcs_workdir import gcs  # noqa: E402,F401  (the emulator fixture)


def test_gs_lock_is_a_lease_renewed_while_held_and_taken_over_after_a_kill(gcs, caplog):
  workdir = f"{gcs}/runs/locked"
  lease = 3.0
  holder = _hold(workdir, lease)
  try:
    time.sleep(lease * 1.5)  # past one lease: the holder's renewals keep it
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {holder.pid}"):
      workdir_lib.RunLock.acquire(workdir, lease_s=lease)  # sees a renewal: alive
  finally:
    _kill(holder)
  start = time.time()
  with caplog.at_level(logging.WARNING, logger="esspr_jax.workdir"):
    lock = workdir_lib.RunLock.acquire(workdir, lease_s=lease)  # waits out the dead lease
  assert time.time() - start <= lease + 2
  assert lock.lock.stale_owner["pid"] == holder.pid and "expired lock lease" in caplog.text
  lock.release()
  from esspr_jax.atomic_io import download
  assert download(f"{workdir}/{workdir_lib.LOCK_NAME}") is None  # released: object gone


def test_a_run_that_raised_frees_its_gs_lock_at_exit(gcs):
  workdir = f"{gcs}/runs/raised"
  env = dict(os.environ, PYTHONPATH=str(TESTS.parent), FSSPEC_GCS_TOKEN="anon",
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  code = ("import sys; from esspr_jax import workdir; workdir.lock_run(sys.argv[1]); "
          "raise RuntimeError('the run failed')")
  out = subprocess.run([sys.executable, "-c", code, workdir], env=env, capture_output=True,
                       text=True, timeout=120)
  assert "the run failed" in out.stderr
  start = time.time()
  workdir_lib.RunLock.acquire(workdir).release()  # at once, not after a 60 s lease
  assert time.time() - start < 10


@pytest.mark.parametrize("mode", ["build", "eval", "export", "duplicates"])
def test_a_stage_that_writes_a_workdir_a_run_holds_is_refused_naming_the_owner(tmp_path, mode):
  """25.9: a build during a training would replace its dataset under it."""
  from esspr_jax import stages  # noqa: PLC0415  (heavy: TensorFlow Datasets, Beam)
  from esspr_jax.paths import Paths  # noqa: PLC0415  (with stages)
  config, paths = _config(), Paths.of(_config(), workdir=tmp_path / "run")
  pairs = tmp_path / "pairs.csv"
  pairs.write_text("cate_lv1_name,cate_name,trigger_id,trigger_title,recall_id,recall_title,"
                   "trigger_img,recall_img,label\n")
  run = {"build": lambda: stages.build(config, paths, pairs, pairs, tmp_path),
         "eval": lambda: stages.evaluate(config, paths),
         "export": lambda: stages.export(config, paths, pairs, tmp_path, tmp_path / "export"),
         "duplicates": lambda: stages.duplicates(config, paths, pairs, tmp_path)}[mode]
  holder = _hold(paths.workdir)
  try:
    with pytest.raises(workdir_lib.WorkdirBusy) as info:
      run()
    assert f"pid {holder.pid}" in str(info.value) and "in use by another run" in str(info.value)
    assert not paths.data_dir.exists() and not (tmp_path / "export").exists()
  finally:
    _kill(holder)
  with pytest.raises(Exception) as info:  # free now: it gets past the lock (to the bad input)
    run()
  assert not isinstance(info.value, workdir_lib.WorkdirBusy)
  _kill(_hold(paths.workdir))  # and released it when it ended
