"""The command line (esspr_jax/cli.py) and the stages it runs (esspr_jax/stages.py):
overrides, bad keys and files, exit codes, the platform check, stage wiring.
The main job end to end, through the console, is tests/test_console.py."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
from absl import flags

from esspr_jax import cli, main, stages
from esspr_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def _parse(*args):
  argv = ["esspr-jax", *args]
  fv = flags.FlagValues()
  cli.define_flags(fv, sys_argv=argv)
  cli.parse_flags(argv, fv)
  return fv


def _only_error_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: ") and "Traceback" not in err
  return lines[0]


def test_config_override_from_the_command_line(tmp_path):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.steps=7",
              "--config.train.mesh.tensor=2", "--mode=train")
  config = cli.config_from_flags(fv)
  assert config.train.steps == 7
  assert config.train.mesh.tensor == 2
  assert fv.mode == "train"


def test_unknown_override_key_is_an_error(tmp_path):
  with pytest.raises(ConfigError, match=r"config.train.stpes: .*Did you mean \"steps\""):
    _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.stpes=3")


def test_unknown_flag_is_an_error(tmp_path):
  with pytest.raises(flags.Error, match="wrkdir"):
    _parse(f"--config={TINY}", f"--wrkdir={tmp_path}")


def test_invalid_value_names_the_key(tmp_path):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.steps=0")
  with pytest.raises(ConfigError, match="train.steps") as info:
    cli.config_from_flags(fv)
  assert info.value.key == "train.steps"


def test_missing_workdir_is_an_error():
  fv = _parse(f"--config={TINY}")
  with pytest.raises(ConfigError, match="--workdir is required"):
    cli.config_from_flags(fv)


def test_url_workdir_is_kept_and_its_data_dirs_are_local(tmp_path, monkeypatch):
  """A gs:// workdir stays a URL (not 'gs:/...'); the data it needs goes to a local
  per-config cache dir (tests/test_gcs_workdir.py runs it against a GCS emulator)."""
  monkeypatch.setenv("ESSPR_DATA_CACHE", str(tmp_path))
  fv = _parse(f"--config={TINY}", "--workdir=gs://bucket/runs/x/", "--mode=train")
  paths = stages.Paths.of(cli.config_from_flags(fv), fv)
  assert str(paths.workdir) == "gs://bucket/runs/x" and paths.data_per_host
  assert paths.world.parent == paths.data_dir.parent and paths.world.parent.parent == tmp_path
  assert paths.logs.parent == paths.world.parent  # log files are appended: kept local
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--world_dir=gs://bucket/w")
  with pytest.raises(ConfigError, match="gs://bucket/w' is a URL") as info:
    stages.Paths.of(cli.config_from_flags(fv), fv)
  assert info.value.key == "--world_dir"


def test_mode_needs_its_flags(tmp_path):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--mode=mine")
  with pytest.raises(ConfigError, match="--clicklog, --catalog, --out"):
    cli.run(cli.config_from_flags(fv), fv)


def test_main_module_is_the_same_command():
  """`python -m esspr_jax.main` and the `esspr-jax` script share one entry point, and
  the names older callers import from main are still there."""
  assert main.entry is cli.entry and main.run is cli.run and main.Paths is stages.Paths
  assert main.prepare_data is stages.prepare_data and main.define_flags is cli.define_flags


@pytest.mark.parametrize("args, fragments", [
    # a bad value: the key it names
    ([f"--config={TINY}", "--workdir={tmp}", "--config.train.batch_size=-1"],
     ["config.train.batch_size"]),
    (["--config={tmp}/nope.py", "--workdir={tmp}"], ["nope.py", "no such file"]),
    # fetch-images needs no workdir, but its own flags
    ([f"--config={REPO}/configs/tiny.py", "--mode=fetch-images"], ["--pairs"]),
    ([f"--config={TINY}:foo", "--workdir={tmp}"], ["takes no argument", "':foo'"]),
], ids=["bad-value", "missing-config-file", "fetch-images-without-flags",
        "argument-to-a-config-without-parameters"])
def test_command_line_errors_are_one_line_and_exit_2(args, fragments, tmp_path, capsys):
  code = cli.execute(["esspr-jax"] + [a.replace("{tmp}", str(tmp_path)) for a in args])
  assert code == 2
  line = _only_error_line(capsys.readouterr().err)
  assert all(f in line for f in fragments), line


@pytest.mark.parametrize("source, fragments", [
    ("def get_config(:\n  pass\n", ["line 1:", "SyntaxError"]),
    ("def get_config():\n  return compose(\n", ["line 2:", "SyntaxError"]),
    ("def get_config():\n  raise RuntimeError('no preset here')\n",
     ["line 2:", "RuntimeError: no preset here"]),
    ("def get_config():\n  raise ValueError('bad preset')\n", ["line 2:", "ValueError: bad preset"]),
    ("def get_config():\n  return {}['preset']\n", ["line 2:", "KeyError: 'preset'"]),
    ("def get_config():\n  return open('/nonexistent/x')\n", ["line 2:", "FileNotFoundError"]),
    ("import no_such_module_here\n", ["line 1:", "ModuleNotFoundError"]),
    ("def get_config():\n  pass\n", ["get_config() returned None"]),
], ids=["syntax", "unclosed", "raises", "value-error", "key-error", "os-error", "import",
        "returns-none"])
def test_a_config_file_that_does_not_load_is_one_line_naming_it(source, fragments, tmp_path,
                                                                capsys):
  """25.20: a config file's own error names the file (and the line), exit 2."""
  path = tmp_path / "broken_config.py"
  path.write_text(source)
  code = cli.execute(["esspr-jax", f"--config={path}", f"--workdir={tmp_path / 'run'}"])
  line = _only_error_line(capsys.readouterr().err)
  assert code == 2, line
  assert line.startswith(f"error: config file {path}"), line
  assert all(f in line for f in fragments), line
  assert not (tmp_path / "run").exists()


def test_help_exits_0_with_the_short_usage(capsys):
  assert cli.execute(["esspr-jax", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("esspr-jax: one config, one workdir, a mode.")
  assert "--workdir" in out and "--[no]allow_cpu" in out and "--verbosity" in out
  assert "--xla_" not in out and len(out.splitlines()) < 120  # ours only, not absl's


_HELP_OF_EACH = """
import runpy, sys
from absl import flags
absl_flags = set(flags.FLAGS)
for module in sys.argv[1:]:
  for name in set(flags.FLAGS) - absl_flags:  # each program defines its own flags
    delattr(flags.FLAGS, name)
  sys.argv = [module, "--help"]
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    print("EXIT", module, e.code, flush=True)
"""


def test_every_recipe_and_the_module_answer_help_with_exit_0():
  """One interpreter runs each program's --help in turn (jax imported once)."""
  modules = ["esspr_jax.main"] + [
      f"esspr_jax.recipes.{p.stem}" for p in sorted((REPO / "esspr_jax/recipes").glob("*.py"))
      if "__main__" in p.read_text()]
  assert len(modules) >= 4
  result = subprocess.run([sys.executable, "-c", _HELP_OF_EACH, *modules], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  exits = [l.split() for l in result.stdout.splitlines() if l.startswith("EXIT ")]
  assert exits == [["EXIT", m, "0"] for m in modules], result.stdout[-3000:]
  for module in modules:  # each printed its own flags before exiting
    assert "--config" in result.stdout.split(f"EXIT {module}")[0], module


def test_a_tpu_config_on_a_cpu_only_jax_is_refused(tmp_path, capsys):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.platform=tpu")
  config = cli.config_from_flags(fv)
  with pytest.raises(ConfigError, match=r"train.platform.*'tpu'.*only CPU.*esspr-jax\[tpu\]"):
    stages.check_platform(config, allow_cpu=False)
  assert stages.check_platform(config, allow_cpu=True) == "cpu"
  assert "[jax] backend cpu: 8 x cpu (1 process)" in capsys.readouterr().out
  config.train.platform = "any"
  config.train.peak_flops = 197e12  # a TPU v5e's peak: the config was written for one
  with pytest.raises(ConfigError, match=r"train.peak_flops.*accelerator"):
    stages.check_platform(config, allow_cpu=False)
  config.train.peak_flops = 0.3e12  # a CPU's
  assert stages.check_platform(config, allow_cpu=False) == "cpu"
  code = cli.execute(["esspr-jax", f"--config={REPO}/configs/pod_v5e.py",
                      f"--workdir={tmp_path}/pod"])
  assert code == 2
  err = capsys.readouterr().err
  assert "only CPU" in _only_error_line(err) and "--allow_cpu" in err
  assert not (tmp_path / "pod" / "world").exists()  # refused before any stage ran


def test_train_mode_prints_its_real_duration(tmp_path, monkeypatch, capsys):
  trained = types.SimpleNamespace(stopped="done", step=3, checkpoint_dir=tmp_path,
                                  metrics_path=tmp_path / "metrics.jsonl")
  monkeypatch.setattr(stages, "train", lambda config, paths: time.sleep(0.3) or trained)
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--mode=train")
  assert cli.run(cli.config_from_flags(fv), fv) is trained
  out = capsys.readouterr().out
  seconds = float(out.split("done in ")[1].split("s (3 steps)")[0])
  assert 0.3 <= seconds < 5
  assert "done in 7.5 min" in stages.summary(stages.Paths.of(cli.config_from_flags(fv), fv),
                                            trained, 450.0)


def test_eval_uses_the_trainers_batch_sharding(tmp_path):
  import jax
  config = cli.config_from_flags(_parse(f"--config={TINY}", f"--workdir={tmp_path}",
                                        "--config.eval.batch_size=24"))
  sharding = stages.eval_batch_sharding(config)
  assert sharding.num_devices == jax.device_count() == 8
  assert sharding.shard_shape((24, 5)) == (3, 5)
  config.eval.batch_size = 12  # 12 rows do not split 8 ways: unsharded, not an error
  assert stages.eval_batch_sharding(config) is None


def test_only_process_0_prepares_data_and_the_others_wait(tmp_path, monkeypatch):
  """--mode=all on a non-primary process: no preparation, the barrier, then training."""
  from esspr_jax.input import pipeline
  calls = []
  monkeypatch.setattr(stages.distributed, "is_primary", lambda: False)
  monkeypatch.setattr(stages, "prepare_data", lambda *a: calls.append("prepare"))
  monkeypatch.setattr(stages.distributed, "barrier", lambda name: calls.append("barrier"))
  monkeypatch.setattr(pipeline, "run_tokenizer", lambda *a: calls.append("open") or "tok")
  monkeypatch.setattr(pipeline, "load_tokenizer", lambda *a: calls.append("open") or "tok")
  trained = types.SimpleNamespace(stopped="done", step=0, checkpoint_dir=tmp_path,
                                  metrics_path=tmp_path / "metrics.jsonl")
  monkeypatch.setattr(stages, "train",
                      lambda config, paths, tok: calls.append(("train", tok)) or trained)
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}")
  cli.run(cli.config_from_flags(fv), fv)
  assert calls == ["barrier", "barrier", "open", ("train", "tok")]
  monkeypatch.setattr(stages.distributed, "is_primary", lambda: True)
  calls.clear()
  cli.run(cli.config_from_flags(fv), fv)
  assert calls[:4] == ["prepare", "barrier", "open", "barrier"]


# ------------------------------------------------------------------ faults, signals
def _command(workdir, *extra):
  return [sys.executable, "-m", "esspr_jax.main", f"--config={TINY}", f"--workdir={workdir}",
          *extra]


def _can_mount_tmpfs() -> bool:
  if not shutil.which("unshare"):
    return False
  probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                          "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
  return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(),
                                 reason="needs `unshare -r -m` to mount a private tmpfs")


class _Run:
  """A started subprocess; result() waits for it (several run side by side)."""

  def __init__(self, argv):
    self.proc = subprocess.Popen(argv, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)

  def result(self, timeout=300) -> subprocess.CompletedProcess:
    out, err = self.proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def _in_private_tmpfs(mount_options: str, argv) -> _Run:
  """Starts argv with /mnt a fresh tmpfs (`mount_options`) seen by it alone."""
  script = f'mount -t tmpfs -o {mount_options} tmpfs /mnt && exec "$@"'
  return _Run(["unshare", "-r", "-m", "sh", "-c", script, "sh", *argv])


_ORBAX_ON_A_FULL_DISK = """
import numpy as np, orbax.checkpoint as ocp
from esspr_jax import cli
try:
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save("/mnt/ckpt", {"w": np.random.default_rng(0).random((512, 1024), np.float32)})
    ckpt.wait_until_finished()
except Exception as e:
  print("FAULT", cli.disk_fault(e))
else:
  print("SAVED")
"""


@needs_tmpfs
def test_read_only_or_full_workdir_is_one_line_and_exit_2():
  """The CLI on a read-only and on a full workdir; and an Orbax save of 2 MB (random:
  no compression) into a 256 KB filesystem, whose error (raised from inside
  Orbax/TensorStore) the CLI's fault check must recognise. All three side by side."""
  cases = {"ro,size=1m": "Read-only file system", "size=256k": "No space left on device"}
  runs = {options: _in_private_tmpfs(options, _command("/mnt/run", "--mode=demo-world"))
          for options in cases}
  orbax = _in_private_tmpfs("size=256k", [sys.executable, "-c", _ORBAX_ON_A_FULL_DISK])
  for options, reason in cases.items():
    result = runs[options].result()
    assert result.returncode == 2, (options, result.stderr[-3000:])
    line = _only_error_line(result.stderr)
    assert line.startswith("error: cannot write ") and "/mnt/run" in line, line
    assert line.endswith(reason), line
  result = orbax.result()
  assert "FAULT cannot write" in result.stdout, result.stdout + result.stderr[-3000:]
  assert "No space left on device" in result.stdout


@needs_tmpfs
def test_a_disk_that_fills_during_a_checkpoint_save_is_one_line(tmp_path):
  """25.19: the workdir on a 512 KB filesystem (the data outside it): the first
  checkpoint's asynchronous write fails. Orbax's other writes then call into a closed
  event loop, and its unfinished tasks are collected after the command: none of that
  reaches the console, only the one error line."""
  run = _in_private_tmpfs("size=512k", _command(
      "/mnt/run", f"--world_dir={tmp_path / 'world'}",
      f"--config.data.pipeline.data_dir={tmp_path / 'tfds'}"))
  result = run.result(timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert _only_error_line(result.stderr) == (
      "error: cannot write under /mnt/run: No space left on device")


def test_sigterm_during_start_up_and_ctrl_c_exit_with_one_line(tmp_path):
  """Each signal once the run has started (its first line printed), before training."""
  procs = {}
  for sig in (signal.SIGTERM, signal.SIGINT):
    procs[sig] = subprocess.Popen(_command(tmp_path / sig.name), cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
  for sig, proc in procs.items():
    first = proc.stdout.readline()
    assert first.startswith("[jax] backend"), first
    proc.send_signal(sig)
  expected = {signal.SIGTERM: (143, "stopped by SIGTERM during start-up"),
              signal.SIGINT: (130, "interrupted (Ctrl-C)")}
  for sig, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    code, text = expected[sig]
    assert proc.returncode == code, err[-3000:]
    assert text in _only_error_line(err)


def test_one_mining_entry_point(tmp_path, capsys):
  """`python -m esspr_jax.ingest.mining` is `esspr-jax --mode=mine`: same checks, same
  one-line errors, same exit code (Beam options, unknown to the CLI, pass through)."""
  flags_ = [f"--config={TINY}", f"--clicklog={tmp_path}/no_log.csv",
            f"--catalog={tmp_path}/no_catalog.csv", f"--out={tmp_path}/pairs.csv"]
  lines = []
  for run_it in (lambda: cli.execute(["esspr-jax", "--mode=mine", *flags_]),
                 lambda: cli.mine_entry(["mining", *flags_, "--direct_num_workers=1"])):
    assert run_it() == 2
    lines.append(_only_error_line(capsys.readouterr().err))
  assert lines[0] == lines[1] and "no_log.csv" in lines[0]
  assert cli.mine_entry(["mining", f"--config={TINY}"]) == 2
  assert "--mode=mine needs --clicklog, --catalog, --out" in capsys.readouterr().err
  # The module run as a script is that same entry point (Beam, imported before the
  # command sets up logging, may warn first about its optional GCP clients).
  proc = subprocess.run([sys.executable, "-m", "esspr_jax.ingest.mining", *flags_,
                         "--direct_num_workers=1"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == lines[0] and "Traceback" not in proc.stderr
  assert not (tmp_path / "pairs.csv").exists()
