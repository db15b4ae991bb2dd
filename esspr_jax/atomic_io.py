"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or
the whole new one, never half of one; a failed write leaves nothing behind.

Local paths: a temp file in the target's directory, renamed into place (os.replace).
The temp file is created as open() would create it, mode 0666 & ~umask (not mkstemp's
0600), so another user (a search service) can read what a run wrote.
Object stores (gs://, s3://): rename is a copy there, not atomic, but one object upload
is: the object appears under its name only once the upload completes. So the content
is collected in memory and uploaded in one request (a resumable upload for objects of
50 MiB and more, which is also committed only at its end); a writer that fails before
the end uploads nothing.
"""
import contextlib
import io
import json
import os
import pathlib
import secrets

from etils import epath


def is_remote(path) -> bool:
  """True for a URL (gs://, s3://): an object store, written by whole-object uploads."""
  return "://" in os.fspath(path)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **open_kwargs):
  """Like open(path, mode) for writing; the file appears at `path` only on success."""
  if is_remote(path):
    with _remote_open(os.fspath(path), mode, **open_kwargs) as f:
      yield f
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = _create_temp(path)
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _create_temp(path: pathlib.Path) -> tuple[int, pathlib.Path]:
  """A new, exclusively created temp file next to `path`; the kernel applies the umask."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
  while True:
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
    try:
      return os.open(tmp, flags, 0o666), tmp
    except FileExistsError:
      continue


@contextlib.contextmanager
def _remote_open(url: str, mode: str, encoding: str | None = None, newline: str | None = None):
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open: mode {mode!r} is not supported for {url} (use 'w' or 'wb')")
  buffer = io.BytesIO() if mode == "wb" else io.StringIO(newline=newline)
  yield buffer
  data = buffer.getvalue()
  upload(url, data if mode == "wb" else data.encode(encoding or "utf-8"))


def object_store(url: str):
  """(filesystem, path) of a remote URL (gs://, s3://, ...) through fsspec."""
  import fsspec  # noqa: PLC0415  (gcsfs/s3fs behind it; only remote paths need it)
  return fsspec.core.url_to_fs(url)


def upload(url: str, data: bytes) -> None:
  """Writes `data` as the object `url` in one upload (never a partial object)."""
  fs, path = object_store(url)
  fs.pipe_file(path, data)


def download(url: str) -> bytes | None:
  """The object's current bytes (no cached listing or size), or None if absent."""
  fs, path = object_store(url)
  fs.invalidate_cache(path)
  try:
    return fs.cat_file(path)
  except FileNotFoundError:
    return None


def write_json(path, obj, *, indent: int | None = 2, sort_keys: bool = True):
  """`obj` as JSON (non-JSON values via str), written atomically: the one writer of
  whole JSON files (configs, manifests, reports, progress records)."""
  return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def atomic_write(path, data: bytes | str):
  """Writes bytes, or str as UTF-8, to `path` atomically; returns the path (an
  epath.Path for a URL, else a pathlib.Path)."""
  with atomic_open(path, "wb") as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return pathlib.Path(path)
