"""TensorBoard event files in a local or gs:// directory: the one writer the trainer's
metrics (metrics_writer.py) and the eval report (retrieval/report.py) both use, kept
below both so the report does not depend on the trainer. tensorboardX is imported only
when a writer is opened (heavy, and only the primary process writes)."""
import os
import pathlib
import shutil
import tempfile
import uuid

from esspr_jax import atomic_io


class TensorBoard:
  """tensorboardX event files in `directory`, local or remote.

  tensorboardX writes with local file APIs; its own gs:// writer (google-cloud-storage,
  a second GCS client with its own auth) re-uploads the whole file at every flush. For a
  remote directory the events are written to a local temp dir instead, and `flush()`
  (and `close()`) uploads each changed event file whole (one upload per file, so
  TensorBoard never reads a half-written object), on the caller's schedule."""

  def __init__(self, directory):
    import tensorboardX  # noqa: PLC0415  (heavy; only the primary process needs it)
    self.directory = directory
    self.remote = atomic_io.is_remote(directory)
    self._local = (pathlib.Path(tempfile.mkdtemp(prefix="esspr-tensorboard-")) if self.remote
                   else pathlib.Path(os.fspath(directory)))
    # Event files are named by the second and host; on a bucket a second writer in the
    # same second would replace the first's object, so remote names get a unique suffix.
    suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}" if self.remote else ""
    self._writer = tensorboardX.SummaryWriter(str(self._local), filename_suffix=suffix)
    self._uploaded: dict[str, int] = {}

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._writer.add_scalar(tag, value, step)

  def flush(self) -> None:
    self._writer.flush()
    if self.remote:
      self._sync()

  def _sync(self) -> None:
    base = os.fspath(self.directory).rstrip("/")
    for path in sorted(self._local.iterdir()):
      size = path.stat().st_size if path.is_file() else None
      if size is not None and self._uploaded.get(path.name) != size:
        atomic_io.upload(f"{base}/{path.name}", path.read_bytes())
        self._uploaded[path.name] = size

  def close(self) -> None:
    self._writer.close()
    if self.remote:
      try:
        self._sync()
      finally:
        shutil.rmtree(self._local, ignore_errors=True)
