"""Preemption of a 2-process run on loopback: a SIGTERM to ONE process makes both
finish the same step, save it and exit 0 (JAX's preemption service agrees on the step
in the background; no collective runs on ordinary steps)."""
import dataclasses
import json
import os
import pathlib
import signal
import sys
import time

from launch import common, local_multiprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "preemption_worker.py"
TIMEOUT_S = 240


def _logs(log_dir) -> str:
  return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(log_dir.glob("*.log")))


def _logged_steps(workdir) -> list[int]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r["step"] for r in rows if r["kind"] == "train"]


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  workdir, log_dir = tmp_path / "run", tmp_path / "logs"
  specs = local_multiprocess.build_specs(
      [sys.executable, str(WORKER), f"--workdir={workdir}"], num_processes=2,
      devices_per_process=2, port=common.free_port())
  specs = [dataclasses.replace(s, env={**s.env, "ESSPR_INIT_TIMEOUT_S": "120"}) for s in specs]
  group = local_multiprocess.ProcessGroup(specs, log_dir=str(log_dir), echo=False, grace_s=3,
                                          cwd=str(REPO)).start()
  deadline = time.monotonic() + TIMEOUT_S
  while len(_logged_steps(workdir)) < 2:  # training for real (steps 5 and 10 logged)
    assert all(p.poll() is None for p in group.processes), _logs(log_dir)
    assert time.monotonic() < deadline, "the run did not start in time:\n" + _logs(log_dir)
    time.sleep(0.1)
  os.kill(group.processes[1].pid, signal.SIGTERM)  # process 1 only
  code = group.wait(timeout_s=TIMEOUT_S)
  logs = _logs(log_dir)
  assert code == 0 and [p.returncode for p in group.processes] == [0, 0], logs

  stopped = {}
  for index in (0, 1):
    text = (log_dir / f"process_{index}.log").read_text()
    assert f"WORKER_SERVICE process={index} running=True" in text  # JAX's, not a collective
    line = [l for l in text.splitlines() if l.startswith("WORKER ")][-1]
    fields = dict(part.split("=") for part in line.split()[1:])
    assert fields["stopped"] == "preempted", line
    stopped[index] = int(fields["step"])
  assert stopped[0] == stopped[1], stopped
  step = stopped[0]
  assert 10 <= step < 2000
  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints[-1] == step, checkpoints
  # Both processes saved their data position at that step: one file each.
  data = workdir / "checkpoints" / str(step) / "data"
  positions = {p.name: json.loads(p.read_text()) for p in data.glob("process_*.json")}
  assert sorted(positions) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert positions["process_0-of-2.json"] == positions["process_1-of-2.json"]
  assert positions["process_0-of-2.json"]["next_index"] == step  # consumed, not prefetched
  assert "preemption signal: saved step" in (log_dir / "process_0.log").read_text()
