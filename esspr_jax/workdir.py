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

One workdir holds one run: `lock_run` takes an exclusive lock for the run's life (a local
flock file naming host/pid, or a gs:// lock object with a renewed lease), so a second run
stops with a clear error instead of logging every step twice or resuming the other's state.
"""
import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from esspr_jax import atomic_io
from esspr_jax import distributed
from esspr_jax.atomic_io import is_remote
from esspr_jax.errors import ConfigError, DataError

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
    rest = text.split("://", 1)[1]
    if not rest.strip("/") or rest.startswith("/"):
      raise ConfigError(flag, f"{text!r} names no bucket")
    if "?" in rest or "#" in rest:
      # The object store's clients would read the rest as a query or fragment, and every
      # checkpoint would land in one database at the part before it.
      raise ConfigError(flag, f"{text!r}: '?' and '#' are not allowed in a workdir URL")
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
  if jax.process_count() == 1:
    return
  mine = np.frombuffer(bytes.fromhex(digest)[:16], np.uint8).astype(np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differing = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
  if differing:
    raise DataError(f"{what} differs between process 0 and process(es) {differing}; every "
                    f"process must train on the same pairs. Point --world_dir and "
                    f"config.data.pipeline.data_dir at one directory all hosts share, or "
                    f"prepare the data once and copy it to every host")


# ----------------------------------------------------------------------------- run lock
LOCK_NAME = ".esspr-run.lock"
# A gs:// lock object is a lease: its owner renews it every LEASE_S / 3 seconds; one not
# renewed for LEASE_S (its owner was killed) is stale and the next run takes it over.
LEASE_S = 60.0

log = logging.getLogger(__name__)


class WorkdirBusy(ConfigError):
  """Another live run holds the workdir's lock (main exits 2)."""

  def __init__(self, workdir, owner: dict | None, lock_path):
    who = (f"host {owner.get('host')} pid {owner.get('pid')} since {owner.get('started')}"
           if owner else "another process")
    super().__init__("--workdir", f"{workdir} is in use by another run ({who}; lock "
                     f"{lock_path}). One workdir holds one run: wait for it to finish, stop "
                     f"it, or pass another --workdir")
    self.owner = owner


def _owner(lease_s: float | None = None) -> dict:
  owner = {"host": socket.gethostname(), "pid": os.getpid(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "token": uuid.uuid4().hex}
  if lease_s is not None:
    owner["lease_s"] = lease_s
    owner["expires"] = time.time() + lease_s
  return owner


def _parse_owner(data: bytes | None) -> dict | None:
  try:
    owner = json.loads(data) if data else None
  except ValueError:
    return {"host": "?", "pid": "?", "started": "? (unreadable lock)"}
  return owner if isinstance(owner, dict) else None


class _LocalLock:
  """flock on <workdir>/.esspr-run.lock, which also names its owner. The kernel drops an
  flock when its process dies (kill -9 included), so a lock file left by a dead run is
  free: the next run takes it and says whose it was."""

  def __init__(self, workdir: pathlib.Path):
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / LOCK_NAME
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _parse_owner(os.pread(fd, 4096, 0))
      os.close(fd)
      raise WorkdirBusy(workdir, owner, self.path) from None
    previous = _parse_owner(os.pread(fd, 4096, 0))
    if previous:
      log.warning("%s: took over the lock of a run that is gone (host %s pid %s, started %s)",
                  workdir, previous.get("host"), previous.get("pid"), previous.get("started"))
    self.stale_owner = previous
    self.owner = _owner()
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self.owner).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # an empty lock file: released cleanly, not stale
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class _ObjectLease:
  """A lock object in a bucket: created only if absent (GCS `ifGenerationMatch=0`), then
  read back (so a store without preconditions cannot hand it to two runs), renewed by a
  daemon thread, deleted on release. An unrenewed lease past its expiry is stale."""

  def __init__(self, workdir, lease_s: float):
    self._io = atomic_io
    self.url = f"{os.fspath(workdir).rstrip('/')}/{LOCK_NAME}"
    self._fs, self._key = atomic_io.object_store(self.url)
    self.lease_s = lease_s
    self.owner = _owner(lease_s)
    self.stale_owner = None
    if not self._create():
      holder = self._wait_for_expiry(workdir, _parse_owner(atomic_io.download(self.url)))
      if holder is not None:
        log.warning("%s: took over the expired lock lease of host %s pid %s (started %s)",
                    workdir, holder.get("host"), holder.get("pid"), holder.get("started"))
        self.stale_owner = holder
        self._delete()
      if not self._create():
        raise WorkdirBusy(workdir, _parse_owner(atomic_io.download(self.url)), self.url)
    if self._holder_token() != self.owner["token"]:
      raise WorkdirBusy(workdir, _parse_owner(atomic_io.download(self.url)), self.url)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, name="esspr-lock-lease", daemon=True)
    self._thread.start()

  def _wait_for_expiry(self, workdir, holder: dict | None) -> dict | None:
    """Waits while the holder's lease runs: a live holder renews it within a third of a
    lease (WorkdirBusy at once then); a dead one's expires (returned, to take over). A
    run killed with SIGKILL thus delays the relaunch by at most one lease."""
    if holder is None or holder.get("expires", 0) <= time.time():
      return holder
    log.warning("%s: lock held by host %s pid %s; waiting up to %.0fs to see whether it is "
                "alive (it renews its lease) or gone (the lease expires)", workdir,
                holder.get("host"), holder.get("pid"), holder["expires"] - time.time())
    while time.time() < holder["expires"]:
      time.sleep(min(1.0, self.lease_s / 10))
      now = _parse_owner(self._io.download(self.url))
      if now is None:
        return None  # released meanwhile
      if now.get("token") != holder.get("token") or now.get("expires") != holder["expires"]:
        raise WorkdirBusy(workdir, now, self.url)  # renewed, or taken by another run
    return holder

  def _create(self) -> bool:
    try:
      self._fs.pipe_file(self._key, json.dumps(self.owner).encode(), mode="create")
      return True
    except FileExistsError:
      return False

  def _delete(self) -> None:
    try:
      self._fs.rm_file(self._key)
    except FileNotFoundError:
      pass

  def _holder_token(self):
    return (_parse_owner(self._io.download(self.url)) or {}).get("token")

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_s / 3):
      try:
        if self._holder_token() != self.owner["token"]:
          log.error("%s: this run's lock lease was taken over by another run", self.url)
          return
        self.owner["expires"] = time.time() + self.lease_s
        self._io.upload(self.url, json.dumps(self.owner).encode())
      except Exception as e:  # noqa: BLE001  (retry at the next beat; the lease is long)
        log.warning("%s: could not renew the lock lease: %s", self.url, e)

  def release(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join(timeout=10)
    try:
      if self._holder_token() == self.owner["token"]:
        self._delete()
    except Exception as e:  # noqa: BLE001  (an unreleased lease expires by itself)
      log.warning("%s: could not delete the lock object (it expires in %.0fs): %s",
                  self.url, self.lease_s, e)


class RunLock:
  """The workdir's exclusive lock for one run's life (one handle per process; taking it
  again in the same process nests). `release` when the run ends; a process exiting
  with it held (a run that raised) releases it at exit; one killed outright leaves a
  lock the next run recovers (local: at once; gs://: once the lease expires)."""

  _held: dict = {}  # workdir text -> [lock, depth]
  _atexit_registered = False

  def __init__(self, key: str, lock):
    self._key = key
    self.lock = lock

  @classmethod
  def acquire(cls, workdir, lease_s: float = LEASE_S) -> "RunLock":
    key = os.fspath(workdir)
    if key in cls._held:
      cls._held[key][1] += 1
      return cls(key, cls._held[key][0])
    if is_remote(key):
      lock = _ObjectLease(key, lease_s)
    else:
      lock = _LocalLock(pathlib.Path(key))
    cls._held[key] = [lock, 1]
    if not cls._atexit_registered:
      atexit.register(cls._release_all)  # a run that raised still frees its workdir
      cls._atexit_registered = True
    return cls(key, lock)

  @classmethod
  def _release_all(cls) -> None:
    for key, (lock, _) in list(cls._held.items()):
      del cls._held[key]
      try:
        lock.release()
      except Exception as e:  # noqa: BLE001  (exiting anyway; a lease expires by itself)
        log.warning("could not release the lock of %s: %s", key, e)

  def release(self) -> None:
    entry = self._held.get(self._key)
    if entry is None or entry[0] is not self.lock:
      return
    entry[1] -= 1
    if entry[1] == 0:
      del self._held[self._key]
      self.lock.release()


def lock_run(workdir, primary: bool = True, lease_s: float = LEASE_S) -> RunLock | None:
  """Takes the workdir's run lock on the primary process; every process learns whether
  it was refused (a collective), so a second run stops on all of its processes with
  WorkdirBusy instead of logging every step twice or resuming the other run's state."""
  lock, refused = None, None
  if primary:
    try:
      lock = RunLock.acquire(workdir, lease_s)
    except WorkdirBusy as e:
      refused = e
  if distributed.any_process(refused is not None):
    if lock is not None:
      lock.release()
    raise refused or WorkdirBusy(workdir, None, f"{os.fspath(workdir)}/{LOCK_NAME}")
  return lock


@contextlib.contextmanager
def holding_run(workdir, primary: bool = True):
  """`lock_run` for one stage's life (build, eval, export, duplicates write the workdir
  too): a stage started on a workdir a run holds stops with WorkdirBusy instead of
  replacing the data or files that run is using; the lock is released when it ends."""
  lock = lock_run(workdir, primary)
  try:
    yield
  finally:
    if lock:
      lock.release()
