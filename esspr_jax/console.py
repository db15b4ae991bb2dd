"""A quiet console: the job's own lines on the console, library logs in a file.

absl, TFDS, Beam, Orbax, Grain and JAX log through Python logging (absl's handler,
warnings.warn); all of it goes to <workdir>/logs/<name>.log at INFO, and so does what
native code writes to stderr (XLA, Gloo, gRPC: file descriptor 2). The console
gets only what the job prints itself (stage lines, progress, tables) plus esspr_jax's
own warnings and errors as `warning: ...` / `error: ...` lines. `--verbosity=1` also
shows every library record on stderr (2: DEBUG too).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import socket
import sys
import warnings

from absl import logging as absl_logging

from esspr_jax import atomic_io

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OWN = "esspr_jax"
_RANK_ENV = ("ESSPR_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "CLOUD_TPU_TASK_ID")


class _OwnLines(logging.Filter):
  """esspr_jax's WARNING+ records only (the job's own, worth a console line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == _OWN and record.levelno >= logging.WARNING


class _OwnFormatter(logging.Formatter):

  def format(self, record: logging.LogRecord) -> str:
    return f"{record.levelname.lower()}: {record.getMessage()}"


class _LogFile(logging.FileHandler):
  """The log file, best effort: on a full or vanished disk a record is dropped (the
  CLI's one error line says what happened) instead of a '--- Logging error ---' page."""

  def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802
    del record


def quiet_native_logs() -> None:
  """Before jax/TF C++ start: their own stderr logs at ERROR (the rest is noise such
  as 'Unable to initialize backend'), unless the caller set the variables."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  os.environ.setdefault("GLOG_minloglevel", "2")


def log_file_name(environ=os.environ) -> str:
  """`main.log` for one process; `process_R.log` when a launcher gives the rank."""
  for key in _RANK_ENV:
    if environ.get(key, "").isdigit():
      return f"process_{environ[key]}.log"
  return "main.log"


@contextlib.contextmanager
def session(log_dir: pathlib.Path | None, verbosity: int = 0):
  """Within the block, all logging goes to `log_dir/<log_file_name()>` (None: no
  file) and the console as the module doc says; yields the log file's path. Raises
  OSError when the log dir cannot be written (a read-only or full workdir shows here,
  first). The previous logging set-up is back afterwards (tests run many commands in
  one process)."""
  root = logging.getLogger()
  saved = (list(root.handlers), root.level, absl_logging.get_verbosity())
  handlers = []
  path = None
  if log_dir is not None:
    log_dir = pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / log_file_name()
    file_handler = _LogFile(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handlers.append(file_handler)
  stderr = logging.StreamHandler()  # whatever sys.stderr is when a record comes
  if verbosity >= 1:
    stderr.setFormatter(logging.Formatter(LOG_FORMAT))
  else:
    stderr.addFilter(_OwnLines())
    stderr.setFormatter(_OwnFormatter())
  handlers.append(stderr)

  for handler in saved[0]:  # absl's stderr handler, or an earlier set-up
    root.removeHandler(handler)
  for handler in handlers:
    root.addHandler(handler)
  level = logging.DEBUG if verbosity >= 2 else logging.INFO
  root.setLevel(level)
  absl_logging.set_verbosity(absl_logging.DEBUG if verbosity >= 2 else absl_logging.INFO)
  for name in ("absl", "orbax", "grain", "tensorflow_datasets", "jax", "apache_beam", _OWN):
    logging.getLogger(name).setLevel(logging.NOTSET)  # the root's level decides
  logging.captureWarnings(True)
  if verbosity < 1:
    _quiet_progress_bars()
  native = _native_stderr_to(path) if path is not None and verbosity < 1 else None
  stderr.setStream(sys.stderr)  # the console, not descriptor 2 (now the log file)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("default")  # each warning once per place, into the log
      yield path
  finally:
    if native is not None:
      native.restore()
    logging.captureWarnings(False)
    for handler in handlers:
      root.removeHandler(handler)
      handler.close()
    for handler in saved[0]:
      root.addHandler(handler)
    root.setLevel(saved[1])
    absl_logging.set_verbosity(saved[2])


class _NativeStderr:
  """File descriptor 2 pointed at the log file, so what C++ (XLA's slow-compile alarm,
  Gloo, gRPC) and worker processes write to stderr lands there; sys.stderr keeps the
  console on a copy of the original descriptor. restore() puts both back."""

  def __init__(self, path: pathlib.Path):
    sys.stderr.flush()
    self._saved_fd = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    self._saved_stream = sys.stderr
    if _is_fd2(sys.stderr):  # a real console (not a test's capture): keep writing there
      sys.stderr = os.fdopen(os.dup(self._saved_fd), "w", buffering=1,
                             encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                             errors="backslashreplace")

  def restore(self) -> None:
    if sys.stderr is not self._saved_stream:
      sys.stderr.flush()
      sys.stderr.close()
      sys.stderr = self._saved_stream
    os.dup2(self._saved_fd, 2)
    os.close(self._saved_fd)


def _is_fd2(stream) -> bool:
  try:
    return stream.fileno() == 2
  except (AttributeError, OSError, ValueError):
    return False


def _native_stderr_to(path: pathlib.Path) -> _NativeStderr | None:
  try:
    return _NativeStderr(path)
  except OSError:  # no descriptor 2 to redirect (an embedded interpreter): leave it be
    return None


def _quiet_progress_bars() -> None:
  """TFDS's tqdm bars write straight to the console, not through logging."""
  import tensorflow_datasets as tfds  # noqa: PLC0415  (TensorFlow: only runs that build data)
  tfds.disable_progress_bar()


def default_log_dir(workdir, fallback: pathlib.Path) -> pathlib.Path:
  """<workdir>/logs for a local workdir; for a gs:// one, a local dir (`fallback`):
  a log file is appended line by line, which object stores do not do."""
  if workdir is not None and not atomic_io.is_remote(workdir):
    return pathlib.Path(workdir) / "logs"
  return fallback / f"logs-{socket.gethostname()}"


class _LinesToLog(io.TextIOBase):
  """A text stream that logs each whole line it is given."""

  def __init__(self, logger: logging.Logger):
    self._logger = logger
    self._pending = ""

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    self._pending += text
    *lines, self._pending = self._pending.split("\n")
    for line in lines:
      if line.strip():
        self._logger.info("%s", line)
    return len(text)

  def flush(self) -> None:
    if self._pending.strip():
      self._logger.info("%s", self._pending)
    self._pending = ""


@contextlib.contextmanager
def library_prints(logger_name: str):
  """What a library prints to stdout in this block goes to its logger instead (TFDS's
  "Downloading and preparing dataset ..." lines are print()s, not log records)."""
  stream = _LinesToLog(logging.getLogger(logger_name))
  with contextlib.redirect_stdout(stream):
    yield
  stream.flush()
