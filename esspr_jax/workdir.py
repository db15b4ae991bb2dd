"""Where a run's files live: a local directory or an object store (`gs://bucket/run`).

The workdir (checkpoints, metrics, TensorBoard events, eval reports, config.json) goes
through `etils.epath`, which hands `gs://` (and `s3://`) to fsspec (gcsfs) and keeps
local paths on the os module. Orbax writes checkpoints there itself (tensorstore's own
GCS driver).

The built-in demo data (world, mined pairs, TFDS datasets, tokenizer) is always on
local disk, because Beam's DirectRunner, Grain/ArrayRecord readers and the image files
are local-disk tools. With a local workdir it is `<workdir>/world` and `<workdir>/tfds`
as before. With a remote workdir every host generates it (the generator is seeded, so
every host gets the same bytes) into a local cache dir derived from the config
(`local_data_root`); `--world_dir` and `config.data.pipeline.data_dir` override it.
"""
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib

from etils import epath

from esspr_jax.atomic_io import is_remote
from esspr_jax.errors import ConfigError

# The local cache for data of remote-workdir runs: $ESSPR_DATA_CACHE, else
# $XDG_CACHE_HOME/esspr_jax/data, else ~/.cache/esspr_jax/data.
CACHE_ENV = "ESSPR_DATA_CACHE"


def workdir_path(workdir, flag: str = "--workdir") -> epath.Path:
  """The workdir as an epath: a URL as given (no 'gs:/' mangling), a local path absolute."""
  text = os.fspath(workdir)
  if not text.strip():
    raise ConfigError(flag, "is empty")
  if is_remote(text):
    scheme = text.split("://", 1)[0]
    if scheme not in ("gs", "s3"):
      raise ConfigError(flag, f"{text!r}: only gs:// (and s3://) URLs are supported")
    if not text.split("://", 1)[1].strip("/"):
      raise ConfigError(flag, f"{text!r} names no bucket")
    backend = {"gs": "gcsfs", "s3": "s3fs"}[scheme]
    if importlib.util.find_spec(backend) is None:
      raise ConfigError(flag, f"{text!r} needs the fsspec backend {backend} "
                        f"(pip install {backend}; requirements.txt has gcsfs)")
    return epath.Path(text.rstrip("/"))
  return epath.Path(pathlib.Path(text).absolute())


def local_path(path, flag: str) -> pathlib.Path:
  """An absolute local path for data the local-disk tools read; a URL is a ConfigError."""
  if is_remote(path):
    raise ConfigError(flag, f"{os.fspath(path)!r} is a URL; this must be a local directory "
                      f"(Beam DirectRunner, Grain/ArrayRecord and image files use local disk)")
  return pathlib.Path(os.fspath(path)).absolute()


def cache_root() -> pathlib.Path:
  configured = os.environ.get(CACHE_ENV)
  if configured:
    return pathlib.Path(configured).absolute()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "esspr_jax" / "data"


def data_key(config) -> str:
  """What the demo data depends on (world generator and mining settings), hashed: runs
  with the same settings share one local copy; a changed setting gets a fresh one."""
  data = {"world": config.data.world.to_dict(), "mining": config.data.mining.to_dict()}
  text = json.dumps(data, sort_keys=True, default=str)
  return f"{config.get('preset', 'run')}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def local_data_root(config) -> pathlib.Path:
  """The local dir holding world/ and tfds/ for a run whose workdir is remote."""
  return cache_root() / data_key(config)


def default_data_dir(config, workdir) -> pathlib.Path | epath.Path:
  """The TFDS data dir: config.data.pipeline.data_dir; else <workdir>/tfds for a local
  workdir, <local_data_root>/tfds for a remote one."""
  configured = config.data.pipeline.data_dir
  if configured:
    return epath.Path(configured) if is_remote(configured) else pathlib.Path(configured)
  if is_remote(workdir):
    return local_data_root(config) / "tfds"
  return pathlib.Path(os.fspath(workdir)) / "tfds"


@contextlib.contextmanager
def host_lock(directory: pathlib.Path, name: str = ".esspr-prepare.lock"):
  """An exclusive lock on `directory` among the processes of this host (flock), so the
  processes that share a local cache prepare it one after the other."""
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / name, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def files_digest(paths) -> str:
  """sha256 over the files' names and bytes: two hosts' copies agree iff it does."""
  h = hashlib.sha256()
  for path in paths:
    path = pathlib.Path(path)
    h.update(path.name.encode() + b"\0")
    h.update(path.read_bytes() if path.is_file() else b"<missing>")
  return h.hexdigest()


def check_same_everywhere(digest: str, what: str) -> None:
  """Raises DataError on every process unless all processes pass the same `digest` (a
  collective: every process calls it at the same point). One process: nothing to do."""
  import jax  # noqa: PLC0415
  if jax.process_count() == 1:
    return
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  mine = np.frombuffer(bytes.fromhex(digest)[:16], np.uint8).astype(np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differing = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differing:
    from esspr_jax.errors import DataError  # noqa: PLC0415
    raise DataError(f"{what} differs between process 0 and process(es) {differing}; every "
                    f"process must train on the same pairs. Point --world_dir and "
                    f"config.data.pipeline.data_dir at one directory all hosts share, or "
                    f"prepare the data once and copy it to every host")
