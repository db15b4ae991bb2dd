"""Global batches built and sent to the devices while the current step runs.

A background thread takes host batches from the data iterator, turns each into a
global device batch (`build`, e.g. `sharding.global_batch`) and queues up to `depth` of
them, so the host's data work and the host-to-device copy overlap the step.

Each batch travels with the iterator's position right after it (`DataPosition`). A
checkpoint must store the position after the last batch the step CONSUMED, not the
iterator's live position, which is up to `depth + 1` batches ahead: a run resumed from
it then trains on exactly the batches it had not trained on.
"""
import json
import queue
import threading
from typing import Any, Callable, Iterator

_POLL_S = 0.05


class DataPosition:
  """A data-iterator position frozen at one batch, savable where the iterator is.

  Grain's Orbax handler (`grain.checkpoint.CheckpointSave`) writes
  `item.get_state().decode()` for anything that is not a `grain.DatasetIterator`, so
  this saves the same text the iterator itself would have saved at that batch."""

  def __init__(self, state: Any):
    if isinstance(state, bytes):
      self._text = state
    else:  # a grain.DatasetIterator's dict state, written as Grain writes it
      self._text = json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._text


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """`next()` -> (device batch, DataPosition after it), in the iterator's order.

  depth 0 builds each batch inline when asked (no thread). An error raised by the
  iterator or by `build` is raised by the `next()` that would have returned that
  batch. Use as a context manager (or call `close`) so the thread stops."""

  def __init__(self, iterator: Iterator, build: Callable[[Any], Any], depth: int):
    self._iterator = iterator
    self._build = build
    self.depth = depth
    self.consumed = DataPosition(iterator.get_state())  # nothing consumed yet
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._thread = None
    if depth > 0:
      self._thread = threading.Thread(target=self._fill, name="esspr-prefetch", daemon=True)
      self._thread.start()

  def _produce(self):
    host_batch = next(self._iterator)
    position = DataPosition(self._iterator.get_state())
    return self._build(host_batch), position

  def _fill(self) -> None:
    while not self._stop.is_set():
      try:
        item = self._produce()
      except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
        item = _Failure(e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=_POLL_S)
          break
        except queue.Full:
          continue
      if isinstance(item, _Failure):
        return

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      batch, position = self._produce()
    else:
      item = self._queue.get()
      if isinstance(item, _Failure):
        self._queue.put(item)  # every later call fails the same way
        raise item.error
      batch, position = item
    self.consumed = position
    return batch, position

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)  # a load in progress may outlive it (daemon)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
