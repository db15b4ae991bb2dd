"""Checkpoints that resume exactly: train state and the data iterator in one step dir.

The Grain iterator's position is saved next to params and optimizer state, so a run
restarted after a crash or preemption sees the very batches it would have seen. Saves
are asynchronous (training continues while arrays are written); Orbax commits a step
atomically, so a run killed mid-save leaves the previous step as the latest.
"""
import pathlib
import signal
import threading
from typing import Any

import grain
import grain.checkpoint  # noqa: F401  (registers the Grain handler with Orbax)
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data"


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep`."""

  def __init__(self, directory: str | pathlib.Path, every: int, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, DATA))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def path(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def last_good(self) -> str:
    """Where the newest committed checkpoint lives, for error messages."""
    self._manager.wait_until_finished()
    step = self._manager.latest_step()
    return str(self.path(step)) if step is not None else "none (no checkpoint saved yet)"

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
    shardings: the mesh may differ from the one that saved); sets the iterator's
    position in place."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: grain.checkpoint.CheckpointRestore(data_iterator),
        }))
    return restored[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for a restore."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class PreemptionWatch:
  """Turns SIGTERM into a flag the loop reads after each step: finish, save, exit 0."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = signals
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
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
    return self._event.is_set()
