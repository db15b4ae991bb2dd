"""The mined table as batch i's 'hard_negative' side, and its versions over training.

The table changes while the pipeline reads ahead, so each version says from which
batch index it applies: batch i is built from the newest version whose first batch
is <= i. Versions are saved (atomically, one file each, under
<workdir>/hard_negatives/) with the step they were mined at; a resumed run reloads
those mined at or before its checkpoint step and so builds the batches the
uninterrupted run built.
"""
import dataclasses
import hashlib
import io
import logging
import pathlib
import re
import threading
import time
from typing import List, Optional

import grain
import numpy as np

from esspr_jax import atomic_io

log = logging.getLogger(__name__)
_NAME = re.compile(r"^mined-(\d{9})\.npz$")


@dataclasses.dataclass(frozen=True)
class Version:
  first_batch: int  # the first batch index built from this table
  mined_step: int   # the train step (batches consumed) it was mined at
  next_step: int    # when the next mining is due (the schedule, saved for a resume)
  table: np.ndarray  # int64 [pairs, per_trigger] listing rows


class Versions:
  """The installed tables, oldest first; thread-safe (Grain reads from its threads)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._versions: List[Version] = []
    self.max_built = -1  # the highest batch index built so far

  @property
  def latest(self) -> Optional[Version]:
    with self._lock:
      return self._versions[-1] if self._versions else None

  def install(self, version: Version) -> None:
    with self._lock:
      if self._versions and version.first_batch < self._versions[-1].first_batch:
        raise ValueError(f"hard negatives: a version from batch {version.first_batch} "
                         f"after one from {self._versions[-1].first_batch}")
      self._versions.append(version)

  def table_for(self, batch_index: int) -> Optional[np.ndarray]:
    with self._lock:
      self.max_built = max(self.max_built, batch_index)
      for version in reversed(self._versions):
        if version.first_batch <= batch_index:
          return version.table
    return None


def save_version(directory, version: Version) -> pathlib.Path:
  """mined-<step>.npz, then its sha256 beside it (a table without one is from before
  the hash, or its writer died between the two: it is then checked without it)."""
  buffer = io.BytesIO()
  np.savez(buffer, table=version.table, first_batch=version.first_batch,
           mined_step=version.mined_step, next_step=version.next_step)
  data = buffer.getvalue()
  path = atomic_io.atomic_write(pathlib.Path(directory) / f"mined-{version.mined_step:09d}.npz",
                                data)
  atomic_io.atomic_write(_hash_path(path), hashlib.sha256(data).hexdigest() + "\n")
  return path


class DamagedTable(ValueError):
  """A saved table that cannot be this run's: unreadable, altered, or out of range."""


def _hash_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".sha256")


def _scalar(f, key: str) -> int:
  value = f[key]
  if value.shape != () or value.dtype.kind not in "iu":
    raise DamagedTable(f"{key} is {value.dtype} of shape {value.shape}, not an integer")
  return int(value)


def read_version(path, *, pairs: int, listings: int, per_trigger: int) -> Version:
  """One saved table, checked whole: its hash, fields, shape, dtype and every row in
  [0, listings). Anything else is a DamagedTable saying why."""
  path = pathlib.Path(path)
  data = path.read_bytes()
  hash_path = _hash_path(path)
  if hash_path.is_file() and hash_path.read_text().strip() != hashlib.sha256(data).hexdigest():
    raise DamagedTable(f"its bytes differ from {hash_path.name}")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      version = Version(_scalar(f, "first_batch"), _scalar(f, "mined_step"),
                        _scalar(f, "next_step"), f["table"])
  except DamagedTable:
    raise
  except Exception as e:  # noqa: BLE001  (a damaged zip/npy fails in many ways)
    raise DamagedTable(f"unreadable ({type(e).__name__}: {e})") from None
  table = version.table
  if table.dtype.kind not in "iu":
    raise DamagedTable(f"the table is {table.dtype}, not integer rows")
  if table.shape != (pairs, per_trigger):
    raise DamagedTable(f"the table has shape {table.shape}; this run has {pairs} pairs x "
                       f"{per_trigger} per trigger")
  if table.size and (table.min() < 0 or table.max() >= listings):
    raise DamagedTable(f"rows {int(table.min())}..{int(table.max())} leave the catalog's "
                       f"{listings} listings")
  if version.mined_step != int(_NAME.match(path.name).group(1)):
    raise DamagedTable(f"it says it was mined at step {version.mined_step}")
  return dataclasses.replace(version, table=np.asarray(table, np.int64))


def set_aside(path: pathlib.Path) -> pathlib.Path:
  """Moves a damaged table (and its hash) to <directory>.corrupt/, as damaged
  checkpoints are, so the miner mines it afresh and nothing is deleted."""
  target = path.parent.with_name(path.parent.name + ".corrupt") / f"{path.name}-{int(time.time())}"
  target.parent.mkdir(parents=True, exist_ok=True)
  if _hash_path(path).is_file():
    _hash_path(path).rename(_hash_path(target))
  path.rename(target)
  return target


def load_versions(directory, up_to_step: int, *, pairs: int, listings: int,
                  per_trigger: int) -> List[Version]:
  """The saved versions mined at or before `up_to_step`, oldest first. A damaged one is
  named in a warning and set aside (set_aside); the miner then mines again."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  out = []
  for path in sorted(directory.iterdir()):
    match = _NAME.match(path.name)
    if not match or int(match.group(1)) > up_to_step:
      continue
    try:
      out.append(read_version(path, pairs=pairs, listings=listings, per_trigger=per_trigger))
    except DamagedTable as e:
      log.warning("hard negatives: %s is damaged (%s); moved to %s, mining again", path, e,
                  set_aside(path))
  return sorted(out, key=lambda v: (v.first_batch, v.mined_step))


class AttachHardNegatives(grain.transforms.MapWithIndex):
  """Adds batch i's 'hard_negative' side: per_trigger catalog listings per pair, the
  rows of its trigger in the table that applies to batch i, prepared without
  augmentation and collated like the pair sides. Pops the batch's 'source_index'
  (the pairs' positions in the training source). Before any table, every slot holds
  listing 0 (only the shape-probing first read sees that)."""

  def __init__(self, catalog, versions: Versions, per_trigger: int, prepare, collate):
    self._catalog = catalog
    self._versions = versions
    self._per_trigger = per_trigger
    self._prepare = prepare  # stored side -> prepared side (no augmentation)
    self._collate = collate  # Collate over the one side 'hard_negative'

  def map_with_index(self, index: int, element: dict) -> dict:
    element = dict(element)
    pairs = np.asarray(element.pop("source_index"), np.int64)
    table = self._versions.table_for(index)
    rows = (np.zeros(pairs.size * self._per_trigger, np.int64) if table is None
            else table[pairs].reshape(-1))
    examples = [{"hard_negative": self._prepare(self._catalog[int(r)]), "valid": True}
                for r in rows]
    return element | {"hard_negative": self._collate(examples)["hard_negative"]}
