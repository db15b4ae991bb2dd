"""metrics.jsonl never ends with a torn line: whole-line appends (a failed write is cut
back), a torn tail repaired before appending, and a reader that skips a torn last line."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from esspr_jax import jsonl, metrics_writer
from esspr_jax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Writes metrics rows under a file-size limit (what a full disk does to a writer: the
# write that crosses it is short, the next ones fail) until a write fails.
_FILL_UP = """
import io, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from esspr_jax import metrics_writer
writer = metrics_writer.MetricsWriter(sys.argv[1], 1000, console=io.StringIO())
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
for step in range(1, 1000):
  try:
    writer.write(step, {"loss": 1.0 / step, "grad_norm": 0.5})
  except OSError as e:
    print("FAILED at", step, type(e).__name__, flush=True)
    break
"""


def test_a_disk_that_fills_mid_row_leaves_whole_lines_only(tmp_path):
  limit = 1000  # bytes: a few rows, the last one cut by the limit
  out = subprocess.run([sys.executable, "-c", _FILL_UP, str(tmp_path), str(limit)],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=120)
  assert "FAILED at" in out.stdout, out.stdout + out.stderr
  text = (tmp_path / "metrics.jsonl").read_text()
  assert text.endswith("\n") and 0 < len(text) <= limit
  rows = [json.loads(line) for line in text.splitlines()]
  assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_a_torn_tail_is_cut_before_the_next_run_appends(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 2, "kind": "tr')
  writer = metrics_writer.MetricsWriter(tmp_path, 10, console=open(os.devnull, "w"))
  writer.write(2, {"loss": 1.5})
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.5)]


def test_the_reader_skips_a_torn_last_line_but_not_damage_elsewhere(tmp_path, caplog):
  path = tmp_path / "log.jsonl"
  path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
  assert jsonl.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  assert "torn last line" in caplog.text
  path.write_text('{"a": 1}\n{"a": 2}')  # complete, only the newline missing: kept
  assert jsonl.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
  with pytest.raises(DataError, match="log.jsonl:2"):
    jsonl.read_jsonl(path)
  assert jsonl.read_jsonl(tmp_path / "absent.jsonl") == []


def test_repaired_text_for_object_store_logs():
  assert jsonl.repaired('{"a": 1}\n{"a"') == '{"a": 1}\n'
  assert jsonl.repaired('{"a": 1}') == '{"a": 1}\n'
  assert jsonl.repaired('{"a": 1}\n') == '{"a": 1}\n'
  assert jsonl.repaired('{"a') == ""
