"""JSON-lines logs that never end mid-line (metrics.jsonl, config_history.jsonl).

Appends are whole lines: each record is one `os.write` of the complete line to an
O_APPEND descriptor, and a short write (disk full, file-size limit) is cut back to the
size before it, so the file still ends with a whole line. A file found ending mid-line
(its writer lost power or the disk filled under another tool) is cut back to its last
whole line before anything is appended, so a new record is never glued onto a torn one.
The reader skips a torn last line with a warning; a bad line elsewhere is a DataError
naming it (that is damage, not a cut-off write).
"""
import json
import logging
import os
import pathlib

from esspr_jax import atomic_io
from esspr_jax.errors import DataError

log = logging.getLogger(__name__)


def repaired(text: str) -> str:
  """`text` ending with a whole line: a torn last line dropped, a complete one ended."""
  head, _, tail = text.rpartition("\n")
  if not tail.strip():
    return text
  if _complete(tail.encode("utf-8")):
    return text + "\n"
  log.warning("dropping a torn last line (%d characters, no newline)", len(tail))
  return head + "\n" if head else ""


def _complete(tail: bytes) -> bool:
  """A last line without its newline that is still one whole JSON record (a prefix of
  a JSON object never parses, so this tells a finished record from a torn one)."""
  try:
    json.loads(tail)
    return True
  except ValueError:
    return False


def cut_torn_tail(path) -> int:
  """Ends a local file with a whole line: a torn last line is truncated away (a complete
  record that only lacks its newline gets one). Returns the bytes removed."""
  path = pathlib.Path(path)
  if not path.is_file():
    return 0
  with open(path, "rb+") as f:
    size = keep = f.seek(0, os.SEEK_END)
    tail = b""
    while keep:  # scan back in blocks for the last newline
      start = max(0, keep - 65536)
      f.seek(start)
      block = f.read(keep - start)
      at = block.rfind(b"\n")
      if at >= 0:
        tail = block[at + 1:] + tail
        keep = start + at + 1
        break
      tail = block + tail
      keep = start
    if not tail:
      return 0
    if _complete(tail):
      f.seek(0, os.SEEK_END)
      f.write(b"\n")
      return 0
    f.truncate(keep)
  log.warning("%s ended mid-line (a cut-off write); removed its last %d bytes", path,
              size - keep)
  return size - keep


class AppendLog:
  """A local text log written in whole lines (a drop-in for open(path, 'a'))."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    cut_torn_tail(self.path)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, text: str) -> int:
    """Appends `text` (whole lines) in one write; on failure the file is as before."""
    data = text.encode("utf-8")
    before = os.fstat(self._fd).st_size
    try:
      written = os.write(self._fd, data)
      if written != len(data):
        raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes "
                      f"(disk full?)")
    except OSError:
      os.ftruncate(self._fd, before)
      raise
    return len(text)

  def flush(self) -> None:
    """Nothing is buffered: every write went to the file whole."""

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def append_jsonl(path, record) -> None:
  """Appends one record as a whole line (a gs:// object is rewritten whole: object
  stores cannot append; fine for small logs like config_history.jsonl)."""
  line = json.dumps(record, sort_keys=True, default=str) + "\n"
  if atomic_io.is_remote(path):
    old = atomic_io.download(os.fspath(path)) or b""
    atomic_io.upload(os.fspath(path), (repaired(old.decode("utf-8")) + line).encode("utf-8"))
    return
  log_file = AppendLog(path)
  try:
    log_file.write(line)
  finally:
    log_file.close()


def read_jsonl(path) -> list[dict]:
  """The records of a JSON-lines file ([] if absent); a torn last line is skipped."""
  if atomic_io.is_remote(path):
    data = atomic_io.download(os.fspath(path))
    text = data.decode("utf-8") if data else ""
  else:
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
  lines = text.split("\n")
  torn = lines.pop()  # "" when the file ends with a newline
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError as e:
      raise DataError(f"{path}:{number}: not a JSON line ({e})") from None
  if torn.strip() and _complete(torn.encode("utf-8")):
    records.append(json.loads(torn))
  elif torn.strip():
    log.warning("%s: skipping a torn last line (%d characters, no newline)", path, len(torn))
  return records
