"""Start N local processes of one command as a single multi-process JAX run.

    python -m launch.local_multiprocess --num_processes=2 --devices_per_process=4 -- \\
        python -m esspr_jax.main --config=configs/tiny.py --workdir=runs/mh

Each process gets ESSPR_COORDINATOR=127.0.0.1:PORT, ESSPR_NUM_PROCESSES and
ESSPR_PROCESS_ID (read by `esspr_jax.distributed.initialize`),
JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT (loopback only, for a run that is local by
construction; `distributed.initialize` would pick the same from the coordinator) and, on CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=M, so 2 x 4 CPU devices behave
like two hosts of a pod (Gloo collectives over loopback). With --platform=gpu each
process sees M GPUs of this machine instead (one process per GPU when M=1).

`--install` first pip-installs this checkout (editable) into the running Python: the
plain package on CPU, the `cuda12` extra with --platform=gpu.

The launcher streams every process's output prefixed with `[pI]`, waits for all,
and if one fails it stops the others (SIGTERM, then SIGKILL) and exits with the
failed process's code: a dead peer would otherwise leave the rest hanging in a
collective until JAX's heartbeat timeout.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

if __package__ in (None, ""):  # `python launch/local_multiprocess.py` works too.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
TIMEOUT_EXIT_CODE = 124


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """One process to start: its id, the env vars it adds, and its argv."""
  process_id: int
  env: Mapping[str, str]
  argv: tuple[str, ...]

  def shell_line(self) -> str:
    return common.with_env(self.env, self.argv)


def _xla_flags_with_device_count(existing: str, count: int) -> str:
  """The caller's XLA_FLAGS with any device-count flag replaced by ours."""
  kept = [f for f in existing.split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={count}"])


def build_specs(command: Sequence[str], *, num_processes: int, devices_per_process: int,
                port: int, platform: str = "cpu",
                base_env: Mapping[str, str] | None = None) -> list[ProcessSpec]:
  """The env and argv of every process; pure, so dry runs and tests see the truth."""
  if num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"--devices_per_process must be >= 1, got {devices_per_process}")
  if not command:
    raise ValueError("no command given: put it after `--`, e.g. -- python -m esspr_jax.main ...")
  if platform not in ("cpu", "gpu"):
    raise ValueError(f"--platform must be cpu or gpu, got {platform!r}")
  base_env = os.environ if base_env is None else base_env
  specs = []
  for pid in range(num_processes):
    env = {
        "ESSPR_COORDINATOR": f"127.0.0.1:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
        "ESSPR_NUM_PROCESSES": str(num_processes),
        "ESSPR_PROCESS_ID": str(pid),
    }
    if platform == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = _xla_flags_with_device_count(base_env.get("XLA_FLAGS", ""),
                                                      devices_per_process)
    else:
      first = pid * devices_per_process
      env["ESSPR_LOCAL_DEVICE_IDS"] = ",".join(
          str(d) for d in range(first, first + devices_per_process))
    specs.append(ProcessSpec(pid, env, tuple(command)))
  return specs


class ProcessGroup:
  """Running processes of one launch; stops all of them when one fails."""

  def __init__(self, specs: Sequence[ProcessSpec], *, log_dir: str | None = None,
               echo: bool = True, grace_s: float = 10.0, cwd: str | None = None):
    self.specs = list(specs)
    self.grace_s = grace_s
    self.processes: list[subprocess.Popen] = []
    self._threads: list[threading.Thread] = []
    self._log_dir = log_dir
    self._echo = echo
    self._cwd = cwd
    self._echo_lock = threading.Lock()

  def start(self) -> "ProcessGroup":
    if self._log_dir:
      os.makedirs(self._log_dir, exist_ok=True)
    for spec in self.specs:
      proc = subprocess.Popen(
          list(spec.argv), env={**os.environ, **spec.env}, cwd=self._cwd,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
          start_new_session=True)  # its own process group: we can stop its children too
      self.processes.append(proc)
      thread = threading.Thread(target=self._pump, args=(spec.process_id, proc), daemon=True)
      thread.start()
      self._threads.append(thread)
    return self

  def _pump(self, pid: int, proc: subprocess.Popen) -> None:
    log_file = (open(os.path.join(self._log_dir, f"process_{pid}.log"), "wb")
                if self._log_dir else None)
    try:
      for line in iter(proc.stdout.readline, b""):
        if log_file:
          log_file.write(line)
          log_file.flush()
        if self._echo:
          with self._echo_lock:
            sys.stdout.write(f"[p{pid}] {line.decode(errors='replace')}")
            sys.stdout.flush()
    finally:
      proc.stdout.close()
      if log_file:
        log_file.close()

  def wait(self, timeout_s: float | None = None) -> int:
    """0 if all succeed; else the first failure's code (128+signal if killed),
    or 124 on timeout. Stops the survivors in both failure cases."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failure = None
    try:
      while True:
        codes = [p.poll() for p in self.processes]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
          failure = _exit_code(failed[0])
          break
        if all(c == 0 for c in codes):
          break
        if deadline is not None and time.monotonic() > deadline:
          failure = TIMEOUT_EXIT_CODE
          break
        time.sleep(0.05)
    finally:
      if failure is not None or any(p.poll() is None for p in self.processes):
        self.stop()
      for thread in self._threads:
        thread.join(timeout=5)
    return failure or 0

  def stop(self) -> None:
    """SIGTERM every live process group, SIGKILL whatever outlives the grace period."""
    for proc in self.processes:
      _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + self.grace_s
    for proc in self.processes:
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, sig)  # the group we created with start_new_session
  except ProcessLookupError:
    pass


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m launch.local_multiprocess",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="virtual CPU devices (or GPUs with --platform=gpu) per process")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 picks a free one")
  parser.add_argument("--timeout_s", type=float, default=None,
                      help="stop everything after this many seconds (exit code 124)")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when stopping")
  parser.add_argument("--log_dir", default=None, help="also write process_I.log files here")
  parser.add_argument("--install", action="store_true",
                      help="pip-install this checkout first (the cuda12 extra with "
                           "--platform=gpu) into the Python running the launcher")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print each process's command with its env vars; start nothing")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="-- then the command every process runs")
  args = parser.parse_args(argv)
  args.command = common.strip_leading_separator(args.command)
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  port = args.port or common.free_port()
  try:
    specs = build_specs(args.command, num_processes=args.num_processes,
                        devices_per_process=args.devices_per_process, port=port,
                        platform=args.platform)
  except ValueError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  install = (common.install_commands(common.shell_join([sys.executable, "-m", "pip"]), REPO,
                                     args.platform, editable=True) if args.install else [])
  if args.dry_run:
    for line in install:
      print(line)
    for spec in specs:
      print(spec.shell_line())
    return 0
  for line in install:
    print(f"+ {line}", flush=True)
    code = subprocess.call(line, shell=True)
    if code:
      print(f"local_multiprocess: install failed with exit code {code}", file=sys.stderr)
      return code
  group = ProcessGroup(specs, log_dir=args.log_dir, grace_s=args.grace_s).start()
  try:
    code = group.wait(args.timeout_s)
  except KeyboardInterrupt:
    group.stop()
    code = 130
  if code:
    print(f"local_multiprocess: run failed with exit code {code}", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
