"""Atomic file writes: a temp file in the target's directory, renamed into place.

A reader (or a run resumed after a kill) sees the old file or the whole new one, never
half of one; a failed write leaves no temp file behind.
"""
import contextlib
import os
import pathlib
import tempfile


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **open_kwargs):
  """Like open(path, mode) for writing; the file appears at `path` only on success."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write(path, data: bytes | str) -> pathlib.Path:
  """Writes bytes, or str as UTF-8, to `path` atomically."""
  with atomic_open(path, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
  return pathlib.Path(path)
