"""Checkpoints that resume exactly: train state and the data iterator in one step dir.

The Grain iterator's position is saved next to params and optimizer state, so a run
restarted after a crash or preemption sees the very batches it would have seen. Saves
are asynchronous (training continues while arrays are written); Orbax commits a step
atomically, so a run killed mid-save leaves the previous step as the latest.

The data position is written once per process (`data/process_I-of-N.json`). A run
resumed with another process count reuses it when every process saved the same
position, which is what the project's pipeline does: its state counts batches of one
global order, and batch k is the same global rows for any process count.

The directory may be local or a URL (gs://...): it stays an `epath.Path` all the way to
Orbax (pathlib would turn 'gs://b' into 'gs:/b'), which writes GCS through tensorstore's
own driver and commits a step there with a marker object instead of a rename.
"""
import json
import logging
import re
import signal
import threading
import time
from typing import Any, Callable, Mapping

import grain
import grain.checkpoint  # noqa: F401  (registers the Grain handler with Orbax)
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from esspr_jax import atomic_io, distributed
from esspr_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep`."""

  def __init__(self, directory: str | epath.PathLike, every: int, keep: int,
               async_save: bool = True):
    self.directory = checkpoint_dir(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, DATA))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def last_good(self) -> str:
    """Where the newest committed checkpoint lives, for error messages."""
    self._manager.wait_until_finished()
    step = self._manager.latest_step()
    return str(self.path(step)) if step is not None else "none (no checkpoint saved yet)"

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save (interval, first save, preemption step)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_iterator: Any, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started."""
    return self._manager.save(
        step, force=force,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: grain.checkpoint.CheckpointSave(data_iterator),
        }))

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """The state at `step`, laid out as `abstract_state` says (shapes, dtypes,
    shardings: the mesh and the process count may differ from the run that saved);
    sets the iterator's position in place (see `data_position_for`)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    saved = read_data_positions(self.path(step) / DATA)
    position = data_position_for(saved, jax.process_index(), jax.process_count(),
                                 where=str(self.path(step) / DATA))
    set_iterator_state(data_iterator, position)
    return restored[STATE]

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores, or (None, None) when there
    is none. A newer one that fails (truncated or corrupt files, e.g. a disk that filled
    during a save) is named in a warning and, once an older one restored, moved aside to
    `<checkpoints>.corrupt/` so the run saves that step afresh. None restoring is a
    DataError naming each failure (nothing is moved: the cause may be elsewhere)."""
    def restore(step):
      return self.restore(step, abstract_state, data_iterator)
    step, state, failed = newest_that_restores(self.all_steps(), restore, self.path,
                                               self.directory)
    if step is None:
      return None, None
    for bad, _ in failed:
      self._set_aside(bad)
    if failed:
      log.warning("resumed from %s; the newer %s did not restore and moved to %s",
                  self.path(step), [str(self.path(b)) for b, _ in failed], self._corrupt_dir())
    log.info("resumed from %s", self.path(step))
    return step, state

  def _corrupt_dir(self) -> epath.Path:
    return self.directory.parent / (self.directory.name + ".corrupt")

  def _set_aside(self, step: int) -> None:
    target = self._corrupt_dir() / f"{step}-{int(time.time())}"
    if "://" in str(self.directory):
      fs, source = atomic_io.object_store(str(self.path(step)))
      fs.mv(source, fs._strip_protocol(str(target)), recursive=True)
    else:
      target.parent.mkdir(parents=True, exist_ok=True)
      self.path(step).rename(target)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def newest_that_restores(steps, restore: Callable[[int], Any], path: Callable[[int], Any],
                         directory) -> tuple[int | None, Any, list[tuple[int, Exception]]]:
  """(step, restore(step), [(newer step, its error)]) for the newest of `steps` that
  restores; (None, None, []) for no steps. What training resumes from and what eval,
  export and search read: a damaged newer one (truncated or corrupt files, e.g. a disk
  that filled during a save) is named in a warning and the one before it tried. A
  ConfigError is a refusal with its own message, not damage, and propagates. None
  restoring is a DataError naming each failure."""
  failed = []
  for step in sorted(steps, reverse=True):
    try:
      return step, restore(step), failed
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001  (Orbax/tensorstore raise many kinds)
      log.warning("checkpoint %s does not restore (%s: %s); trying the one before it",
                  path(step), type(e).__name__, _first_line(e))
      failed.append((step, e))
  if failed:
    raise DataError(f"no checkpoint in {directory} restores: " + "; ".join(
        f"{path(step)}: {type(e).__name__}: {_first_line(e)}" for step, e in failed))
  return None, None, []


def restore_step(step: int, restore: Callable[[int], Any], path: Callable[[int], Any]) -> Any:
  """restore(step) for a step the user named: damage is one DataError naming it."""
  try:
    return restore(step)
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001  (Orbax/tensorstore raise many kinds)
    raise DataError(f"checkpoint {path(step)} does not restore ({type(e).__name__}: "
                    f"{_first_line(e)}); it may be damaged (e.g. a disk that filled during "
                    f"the save): pick another step, or none for the newest that restores"
                    ) from e


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else "")[:limit]


def resume_point(directory) -> dict:
  """{'resuming': whether `directory` holds a committed step, 'step': the newest}, from a
  listing (before any restore): what the saved-config check needs to know."""
  root = checkpoint_dir(directory)
  steps = []
  if root.is_dir():
    remote = "://" in str(root)
    for entry in root.iterdir():
      if entry.name.isdigit() and (not remote or (entry / "commit_success.txt").exists()):
        steps.append(int(entry.name))
  return {"resuming": bool(steps), "step": max(steps) if steps else None}


def checkpoint_dir(directory) -> epath.Path:
  """An epath for Orbax: a URL unchanged, a local path made absolute."""
  text = str(directory)
  if "://" in text:
    return epath.Path(text.rstrip("/"))
  return epath.Path(text).absolute()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for a restore."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


_POSITION_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def read_data_positions(data_dir: epath.Path) -> dict[tuple[int, int], str]:
  """{(process_index, process_count): saved iterator state text} of one checkpoint."""
  saved = {}
  if data_dir.is_dir():
    for path in data_dir.iterdir():
      match = _POSITION_FILE.fullmatch(path.name)
      if match:
        saved[(int(match[1]), int(match[2]))] = path.read_text()
  return saved


def data_position_for(saved: Mapping[tuple[int, int], str], process_index: int,
                      process_count: int, where: str = "the checkpoint") -> str:
  """The iterator state process `process_index` of `process_count` resumes from.

  Its own file when the process count is unchanged. Otherwise the saved position is
  carried over only if every process of the saving run stored the same one (a
  position in a global order of batches, as `data.pipeline` keeps it); anything else
  cannot be repositioned safely and is a ConfigError saying what to do.
  """
  own = saved.get((process_index, process_count))
  if own is not None:
    return own
  if not saved:
    raise ConfigError("train.checkpoint", f"{where} holds no data-iterator position "
                      f"(process_*-of-*.json); it was not written by this trainer")
  counts = sorted({count for _, count in saved})
  if len(counts) != 1:
    raise ConfigError("train.checkpoint", f"{where} mixes data positions of runs with "
                      f"{counts} processes; remove the stray files")
  saved_count = counts[0]
  missing = sorted(set(range(saved_count)) - {index for index, _ in saved})
  if missing:
    raise ConfigError("train.checkpoint", f"{where} lacks the data position of process(es) "
                      f"{missing} of {saved_count}; the checkpoint is incomplete")
  states = {_canonical(text) for text in saved.values()}
  if len(states) != 1:
    raise ConfigError(
        "train.checkpoint",
        f"{where} was saved by {saved_count} processes at different data positions, so it "
        f"cannot be resumed by {process_count}: resume with {saved_count} processes, or "
        f"start a new workdir from these params (e.g. a model.*.init_from checkpoint)")
  return saved[(0, saved_count)]


def _canonical(text: str) -> str:
  try:
    return json.dumps(json.loads(text), sort_keys=True)
  except ValueError:
    return text


def set_iterator_state(iterator: Any, text: str) -> None:
  """Sets a Grain iterator's position from its saved text (what Grain's own Orbax
  handler does on restore), then starts its prefetching."""
  if isinstance(iterator, grain.DatasetIterator):
    iterator.set_state(json.loads(text))
  else:
    iterator.set_state(text.encode())
  start = getattr(iterator, "start_prefetch", None)
  if start is not None:
    start()


class PreemptionWatch:
  """A SIGTERM (preemption notice) to any process -> every process finishes the same
  step, saves it and exits 0; nothing is exchanged on ordinary steps.

  Multi-process runs use JAX's preemption service (started by
  `jax.distributed.initialize`): its own SIGTERM handler tells the coordination
  service, which agrees on a step (the largest step any process has reached, plus one)
  in the background; `reached(step)` is a local check of that answer. A Python handler
  would replace JAX's, so none is installed then. One process needs no agreement: the
  signal sets a flag. Multi-process without the service (disabled by
  `jax_enable_preemption_service`) falls back to agreeing by a collective at sync
  points only (log steps, checkpoints, evals: the same steps on every process).
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = signals
    self._previous = {}
    self.uses_service = distributed.preemption_service_running()

  def __enter__(self):
    if not self.uses_service and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _on_signal(self, signum, frame):
    del frame
    self.signal_received = signum
    self._event.set()

  @property
  def requested(self) -> bool:
    """A signal reached this process (through the Python handler)."""
    return self._event.is_set()

  def reached(self, step: int, sync_point: bool) -> bool:
    """True when the run should save `step` and stop; the same answer on every process.
    Call it after every step with that step's number (the service counts calls);
    `sync_point`: this step already waits for the devices on every process."""
    if self.uses_service:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self.requested
    return sync_point and distributed.any_process(self.requested)
