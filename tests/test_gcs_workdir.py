"""A gs:// workdir end to end, against a local GCS emulator (no network).

`gcp-storage-emulator` serves the GCS JSON API on a free localhost port (started by
tests/gcs_emulator.py, which adds the generation headers tensorstore reads). gcsfs (behind
etils.epath: metrics, reports, config.json, TensorBoard) finds it through
STORAGE_EMULATOR_HOST with anonymous credentials; tensorstore (behind Orbax:
checkpoints) through TENSORSTORE_GCS_HTTP_URL, with a fixed test token instead of the
GCE metadata server. Everything else is the project's real code.
"""
import importlib.util
import json
import os
import re
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import standin  # noqa: E402

# gcsfs reads this when it is imported (first gs:// use): without it, it asks the
# storage-control gRPC API for the bucket's layout, which the emulator does not serve
# (a 60 s timeout per bucket). Real GCS answers; tests need it off.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
if not (importlib.util.find_spec("gcp_storage_emulator") and importlib.util.find_spec("gcsfs")):
  pytest.skip("needs gcp-storage-emulator and gcsfs (requirements-test.txt)",
              allow_module_level=True)

BUCKET = "esspr-test"
REPO = TESTS.parent


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _clear_fs_caches() -> None:
  """Filesystem objects cache their endpoint; drop them when the emulator changes."""
  import fsspec
  from etils.epath import backend
  fsspec.get_filesystem_class("gs").clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A running emulator with bucket BUCKET; the environment points GCS clients at it."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
  server = subprocess.Popen([sys.executable, str(TESTS / "gcs_emulator.py"), str(port), BUCKET],
                            stdout=log, stderr=subprocess.STDOUT)
  env = {
      "STORAGE_EMULATOR_HOST": url,             # gcsfs (and google-cloud-storage)
      "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore's gcs driver (Orbax)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no metadata-server lookup
      "NO_GCE_CHECK": "true",
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  saved_conf = fsspec.config.conf.get("gcs")
  fsspec.config.conf["gcs"] = {"token": "anon"}
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(url + "/", timeout=1).read()
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"the GCS emulator did not start (see {log.name})")
        time.sleep(0.1)
    _clear_fs_caches()
    yield f"gs://{BUCKET}"
  finally:
    server.terminate()
    server.wait(timeout=10)
    log.close()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    if saved_conf is None:
      fsspec.config.conf.pop("gcs", None)
    else:
      fsspec.config.conf["gcs"] = saved_conf
    _clear_fs_caches()


def _objects(url: str) -> list[str]:
  """Every object under `url`, relative to it (a fresh listing, no cache)."""
  import fsspec
  fs, root = fsspec.core.url_to_fs(url)
  fs.invalidate_cache()
  return sorted(p[len(root) + 1:] for p in fs.find(root))


def _read(url: str) -> str:
  from esspr_jax.atomic_io import download
  return download(url).decode("utf-8")


# ------------------------------------------------------------------ atomic writes
def test_atomic_write_round_trip_and_a_failed_writer_leaves_the_old_object(gcs):
  from esspr_jax.atomic_io import atomic_open, atomic_write
  target = f"{gcs}/atomic/table.csv"
  returned = atomic_write(target, "old\n")
  assert str(returned) == target  # not mangled into 'gs:/...'
  assert _read(target) == "old\n"
  with pytest.raises(RuntimeError):
    with atomic_open(target, "w", encoding="utf-8") as f:
      f.write("half of the new " * 1000)
      raise RuntimeError("killed mid-write")
  assert _read(target) == "old\n"
  with pytest.raises(RuntimeError):
    with atomic_open(f"{gcs}/atomic/never.bin", "wb") as f:
      f.write(b"\x00" * 100_000)
      raise RuntimeError("killed before the end")
  assert _objects(f"{gcs}/atomic") == ["table.csv"]  # no partial object, no temp object
  with atomic_open(target, "w", newline="", encoding="utf-8") as f:
    f.write("a,b\r\n1,2\r\n")
  from etils import epath
  assert epath.Path(target).read_bytes() == b"a,b\r\n1,2\r\n"  # newline="" as for csv
  atomic_write(f"{gcs}/atomic/blob.bin", bytes(range(256)))
  assert epath.Path(f"{gcs}/atomic/blob.bin").read_bytes() == bytes(range(256))


def test_eval_reports_and_tensorboard_go_to_gs(gcs):
  from esspr_jax.retrieval import report
  from esspr_jax.retrieval.scoring import SettingResult
  metrics = {"mrr": 0.5, "recall@1": 0.25, "recall@5": 1.0, "queries": 4}
  results = [SettingResult("m-m", metrics, {"kind": "exact"}, 0.1)]
  paths = report.write_eval_reports(results, (1, 5), f"{gcs}/reports/eval", 3,
                                    {"pairs": 4, "gallery": 4})
  assert str(paths["json"]) == f"{gcs}/reports/eval/eval_step_3.json"
  assert json.loads(_read(f"{gcs}/reports/eval/latest.json"))["settings"][0]["setting"] == "m-m"
  report.write_tensorboard(results, f"{gcs}/reports/tensorboard", 3)
  objects = _objects(f"{gcs}/reports")
  assert {"eval/eval_step_3.md", "eval/eval_step_3_recall_at_k.png", "eval/latest.md"} <= set(
      objects)
  assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)


def test_metrics_writer_uploads_at_syncs_and_a_restart_keeps_earlier_rows(gcs):
  import io
  from esspr_jax.metrics_writer import MetricsWriter
  workdir = f"{gcs}/runs/writer"
  writer = MetricsWriter(workdir, 10, console=io.StringIO(), sync_every_s=3600)
  writer.write(1, {"loss": 1.0})
  assert "metrics.jsonl" not in _objects(workdir)  # between syncs: in memory only
  writer.flush()  # what the trainer calls after each checkpoint save
  assert [r["step"] for r in _rows(workdir, "train")] == [1]
  writer.write(2, {"loss": 0.5})
  writer.write(2, {"mrr": 0.25}, kind="eval")  # an eval row syncs at once
  assert [r["step"] for r in _rows(workdir, "train")] == [1, 2]
  writer.write(3, {"loss": float("nan")})
  writer.close()
  restarted = MetricsWriter(workdir, 10, console=io.StringIO())
  restarted.write(4, {"loss": 0.25})
  restarted.close()
  assert [(r["step"], r["loss"]) for r in _rows(workdir, "train")] == [
      (1, 1.0), (2, 0.5), (3, "nan"), (4, 0.25)]
  events = [o for o in _objects(workdir) if o.startswith("tensorboard/events.out.tfevents.")]
  assert len(events) == 2  # one event file per start, each uploaded whole


# ------------------------------------------------------------------ training and resume
def _config(steps):
  from esspr_jax.config import compose
  config = compose("tiny")
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.schedule.warmup_steps = 1
  config.train.optimizer.learning_rate = 1e-2
  config.train.log_every = 1
  config.train.checkpoint.every = 2
  config.eval.every_steps = 2
  return config


def _train(workdir, steps):
  import jax
  import jax.numpy as jnp
  from esspr_jax import train

  def eval_fn(params, step):
    return {"param_sum": float(sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(params)))}

  return train.train(_config(steps), workdir, model=standin.StandInModel(),
                     loss_fn=standin.standin_loss, train_dataset=standin.dataset(8),
                     eval_fn=eval_fn)


def _rows(url: str, kind: str) -> list[dict]:
  rows = [json.loads(line) for line in _read(f"{url}/metrics.jsonl").splitlines()]
  return [r for r in rows if r["kind"] == kind]


def test_training_on_gs_resumes_from_its_checkpoint_and_keeps_every_metrics_row(
    gcs, tmp_path):
  workdir = f"{gcs}/runs/standin"
  first = _train(workdir, 4)
  assert first.step == 4 and first.resumed_from is None
  assert str(first.checkpoint_dir) == f"{workdir}/checkpoints"
  assert str(first.metrics_path) == f"{workdir}/metrics.jsonl"
  objects = _objects(workdir)
  for name in ("config.json", "metrics.jsonl", "checkpoints/2/commit_success.txt",
               "checkpoints/4/commit_success.txt", "checkpoints/4/data/process_0-of-1.json"):
    assert name in objects, (name, objects)
  assert any(o.startswith("tensorboard/events.out.tfevents.") for o in objects)
  assert [r["step"] for r in _rows(workdir, "train")] == [1, 2, 3, 4]
  assert json.loads(_read(f"{workdir}/config.json"))["train"]["steps"] == 4

  # A second start with more steps: resumes at step 4 from gs://, appends its rows.
  second = _train(workdir, 6)
  assert second.resumed_from == 4 and second.step == 6
  assert [r["step"] for r in _rows(workdir, "train")] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in _rows(workdir, "eval")] == [2, 4, 6]

  # The same two starts on a local workdir end bit-identical (params, optimizer and
  # data position all came back from gs://), with the same logged losses.
  _train(tmp_path / "local", 4)
  local = _train(tmp_path / "local", 6)
  assert local.resumed_from == 4
  for name, value in second.state.params.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(local.state.params[name]),
                                  err_msg=name)
  local_rows = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl")
                .read_text().splitlines()]
  assert [r["loss"] for r in _rows(workdir, "train")] == [
      r["loss"] for r in local_rows if r["kind"] == "train"]
  # The restore path for eval/export reads params back from gs:// too.
  from esspr_jax.retrieval import restore
  ckpt_dir, run_dir = restore._locate(workdir)
  assert str(ckpt_dir) == f"{workdir}/checkpoints" and str(run_dir) == workdir


# ------------------------------------------------------------------ the command line
def test_main_job_with_a_gs_workdir_keeps_data_local(gcs, tmp_path, monkeypatch, capsys):
  from absl import flags
  from esspr_jax import main, workdir as workdir_lib
  monkeypatch.setenv(workdir_lib.CACHE_ENV, str(tmp_path / "cache"))
  workdir = f"{gcs}/runs/cli/"
  argv = ["esspr_jax.main", f"--config={REPO / 'configs' / 'tiny.py'}", f"--workdir={workdir}",
          "--config.train.steps=2", "--config.eval.batch_size=24",
          # A text-only model compiles in half the time; the workdir and data paths under
          # test are the same (the world still renders images, TFDS still packs them).
          "--config.model.image.enabled=False", "--config.eval.settings=t-t",
          "--config.loss.pairs.m_m.weight=0", "--config.loss.pairs.t_m.weight=0",
          "--config.loss.pairs.i_m.weight=0", "--config.loss.pairs.t_t.weight=1",
          "--config.loss.pdc.t.weight=0", "--config.loss.pdc.i.weight=0",
          "--config.loss.plc.t.weight=0", "--config.loss.plc.i.weight=0"]
  fv = flags.FlagValues()
  main.define_flags(fv, sys_argv=argv)
  main.parse_flags(argv, fv)
  config = main.config_from_flags(fv)
  paths = main.Paths.of(config, fv)
  run = workdir.rstrip("/")
  assert str(paths.workdir) == run and paths.data_per_host
  local = workdir_lib.local_data_root(config)
  assert local.parent == tmp_path / "cache"
  assert (paths.world, paths.data_dir) == (local / "world", local / "tfds")

  result = main.run(config, fv)
  assert result.step == 2 and result.stopped == "done"
  assert 0.0 < result.eval_metrics["t-t/mrr"] <= 1.0
  out = capsys.readouterr().out
  assert f"checkpoints    {run}/checkpoints" in out and f"eval reports   {run}/eval" in out
  objects = _objects(run)
  for name in ("config.json", "metrics.jsonl", "checkpoints/2/commit_success.txt",
               "eval/latest.md", "eval/eval_step_2.json", "eval/eval_step_2_recall_at_k.png"):
    assert name in objects, (name, objects)
  assert not any(o.startswith(("world/", "tfds/")) for o in objects)  # data stays local
  assert (local / "world" / "manifest.json").is_file() and (local / "tfds").is_dir()
  assert [r["step"] for r in _rows(run, "eval")] == [2]


def test_the_tpu_pod_launchers_gs_command_is_accepted_by_main(capsys, tmp_path, monkeypatch):
  """launch.tpu_pod's default mode starts main with --workdir=gs://...: that command
  line now parses into a gs:// workdir with per-host local data (it used to stop)."""
  import shlex
  from absl import flags
  from esspr_jax import main
  from launch import tpu_pod
  monkeypatch.setenv("ESSPR_DATA_CACHE", str(tmp_path))
  assert tpu_pod.main(["--tpu=pod-a", "--zone=us-west4-a", "--workdir=gs://bucket/runs/base",
                       "--dry-run", "--", "--config.train.log_every=7"]) == 0
  remote = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
  command = next(a for a in remote if a.startswith("--command=")).split("=", 1)[1]
  argv = shlex.split(command.split(" && ", 1)[1])[1:]  # drop the venv's python
  assert argv[:2] == ["-m", "esspr_jax.main"]
  argv = ["esspr_jax.main"] + [a.replace("configs/", f"{REPO}/configs/") for a in argv[2:]]
  fv = flags.FlagValues()
  main.define_flags(fv, sys_argv=argv)
  main.parse_flags(argv, fv)
  config = main.config_from_flags(fv)
  paths = main.Paths.of(config, fv)
  assert config.train.log_every == 7
  assert str(paths.workdir) == "gs://bucket/runs/base" and paths.data_per_host
  assert paths.world.is_relative_to(tmp_path) and paths.data_dir.is_relative_to(tmp_path)


@pytest.mark.parametrize("url, fragment", [
    ("gs://", "names no bucket"),
    ("ftp://host/run", "only gs:// (and s3://) URLs"),
    ("gs:///run", "names no bucket"),  # 25.10: not bucket "run"
    ("gs://bkt/run?x=1#frag", "'?' and '#' are not allowed"),
    ("gs://bkt/run#frag", "'?' and '#' are not allowed"),
    ("s3://bkt/run?versionId=1", "'?' and '#' are not allowed"),
])
def test_bad_workdir_urls_are_config_errors_naming_the_flag(url, fragment):
  from esspr_jax import workdir as workdir_lib
  from esspr_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
    workdir_lib.workdir_path(url)
  assert info.value.key == "--workdir"
  assert str(workdir_lib.workdir_path("gs://b/run/")) == "gs://b/run"


# ------------------------------------------------------------------ two processes on gs://
def test_two_processes_on_gs_resume_after_one_is_killed(gcs, tmp_path):
  """2 processes x 4 devices (tests/multihost_worker.py: the stand-in model through
  train.train) with the workdir on gs://: process 1 is SIGKILLed after checkpoint 4,
  a relaunch resumes from gs:// at step 4 and ends where an uninterrupted local run
  ends, each process's data position is in the bucket, every metrics row logged once."""
  import signal
  import test_multihost as mh
  workdir = f"{gcs}/runs/two_processes"
  # Children read the bucket with anonymous credentials, like this process (fixture).
  os.environ["FSSPEC_GCS_TOKEN"] = "anon"
  try:
    flags = ["--steps=5", "--mesh=8,1,1", "--checkpoint_every=1"]
    group = mh._start(2, [f"--workdir={workdir}", *flags, "--stall_process=1",
                          "--stall_at_batch=4"], tmp_path / "log_killed")
    deadline = time.monotonic() + mh.LAUNCH_TIMEOUT_S
    while "checkpoints/4/commit_success.txt" not in _objects(workdir):
      assert all(p.poll() is None for p in group.processes), mh._logs(tmp_path / "log_killed")
      assert time.monotonic() < deadline, "no checkpoint 4 in time"
      time.sleep(0.5)
    os.kill(group.processes[1].pid, signal.SIGKILL)
    group.wait(timeout_s=60)
    assert group.processes[1].returncode == -signal.SIGKILL
    objects = _objects(workdir)
    assert "checkpoints/5/commit_success.txt" not in objects
    for p in (0, 1):  # each process saved its own data position
      assert f"checkpoints/4/data/process_{p}-of-2.json" in objects, objects

    logs = mh._launch(2, [f"--workdir={workdir}", *flags,
                          f"--dump={tmp_path / 'gs.npz'}"], tmp_path / "log_resumed")
    assert "resumed at step 4" in logs
    assert [r["step"] for r in _rows(workdir, "train")] == [1, 2, 3, 4, 5]
  finally:
    os.environ.pop("FSSPEC_GCS_TOKEN", None)
  mh._launch(2, [f"--workdir={tmp_path / 'local'}", *flags, f"--dump={tmp_path / 'local.npz'}"],
             tmp_path / "log_local")
  mh._assert_same_state(mh._load(tmp_path / "gs.npz"), mh._load(tmp_path / "local.npz"),
                        mh.STATE_TOLERANCE)
  local_losses = mh._losses(tmp_path / "local")
  for row in _rows(workdir, "train"):
    assert abs(row["loss"] - local_losses[row["step"]]) <= mh.LOSS_TOLERANCE, row
