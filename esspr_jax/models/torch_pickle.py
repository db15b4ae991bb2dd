"""Reads torch `.pth` state dicts WITHOUT torch and without unpickling arbitrary objects.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names. Here
the unpickler admits exactly the globals a state dict needs and refuses every other
one before anything is called:
  torch._utils._rebuild_tensor_v2      -> a NumPy view of a storage (offset, size, stride)
  torch.<Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|Bool>Storage
                                       -> a dtype marker (never torch's class)
  collections.OrderedDict              -> the state dict (and tensors' empty hook dicts)
Both on-disk layouts are read:
  legacy (torch < 1.6, `_use_new_zipfile_serialization=False`): pickles of the magic
    number, protocol, system info, the state dict with persistent storage ids, the list
    of storage keys; then each storage as an int64 element count and its raw bytes;
  zip (torch >= 1.6): `*/data.pkl` with the same persistent ids, storages in `*/data/<key>`.
A refused global raises DataError naming it; nothing from the file is executed.
Nor is any memory touched outside the file's bytes: every view (offset, size, stride) is
checked against its storage, storage sizes against the file's size, and all tensors
together against MAX_EXPANSION times it, before anything is allocated or copied.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from esspr_jax.errors import DataError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# All tensors of a file together may hold at most this many times its bytes: room for tied
# and expanded (stride-0) views, not for a few bytes that declare terabytes.
MAX_EXPANSION = 16
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands in for torch.<X>Storage: only its element dtype is used."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


class _Storage:
  """A storage named by the pickle; its bytes are attached after the pickle is read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.array: np.ndarray | None = None


class _Tensor:
  """What `_rebuild_tensor_v2` describes; checked and materialised once the storages are read."""

  def __init__(self, storage, offset, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def check(self, where: str) -> int:
    """The view's element count, after proving it lies inside its storage (raises DataError
    naming `where` otherwise): as_strided would read whatever memory the numbers point at."""
    if not isinstance(self.storage, _Storage):
      raise DataError(f"{where}: has no storage")
    if self.storage.array is None:
      raise DataError(f"{where}: storage {self.storage.key} was never read")
    size, stride, offset = self.size, self.stride, self.offset
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(isinstance(v, int) for v in (offset, *size, *stride))):
      raise DataError(f"{where}: offset, size and stride are not integers")
    if len(size) != len(stride):
      raise DataError(f"{where}: {len(size)} sizes but {len(stride)} strides")
    if offset < 0 or any(v < 0 for v in (*size, *stride)):
      raise DataError(f"{where}: negative offset, size or stride "
                      f"({offset}, {tuple(size)}, {tuple(stride)})")
    numel = math.prod(size)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and last >= self.storage.numel:
      raise DataError(f"{where}: size {tuple(size)} at offset {offset} runs past its storage "
                      f"({self.storage.numel} values)")
    return numel

  def to_numpy(self) -> np.ndarray:
    """A compact copy of the view; `check` must have passed."""
    data = self.storage.array
    if not self.size:
      return data[self.offset].copy()
    if not math.prod(self.size):
      return np.zeros(self.size, data.dtype)
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=[s * data.itemsize for s in self.stride],
        writeable=False)
    return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, *rest):
  return _Tensor(storage, offset, size, stride, *rest)


ALLOWED_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")}
ALLOWED_GLOBALS |= {("torch", name) for name in STORAGE_DTYPES}


class RestrictedUnpickler(pickle.Unpickler):
  """Admits only ALLOWED_GLOBALS (mapped to the stand-ins above); see module doc."""

  def __init__(self, file, where: str, storages: dict | None = None):
    super().__init__(file)
    self.where = where
    self.storages = {} if storages is None else storages

  def find_class(self, module: str, name: str):
    if (module, name) not in ALLOWED_GLOBALS:
      raise DataError(f"{self.where}: refuses to load global {module}.{name}: a state dict "
                      "needs only torch's tensor-rebuild function and storage types")
    if name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if name == "OrderedDict":
      return collections.OrderedDict
    return _StorageType(name)

  def persistent_load(self, pid: Any):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise DataError(f"{self.where}: unsupported persistent id {pid!r:.80}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise DataError(f"{self.where}: storage of unknown type {storage_type!r:.80}")
    key = str(key)
    if not isinstance(numel, int) or numel < 0:
      raise DataError(f"{self.where}: storage {key} has {numel!r:.40} values")
    if key not in self.storages:
      self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
    return self.storages[key]


class _NoGlobals(pickle.Unpickler):
  """For the legacy header pickles (plain numbers and dicts): no global at all."""

  def __init__(self, file, where: str):
    super().__init__(file)
    self.where = where

  def find_class(self, module, name):
    raise DataError(f"{self.where}: refuses to load global {module}.{name} in the header")


def _materialise(obj, where: str, budget: list[int], name: str = ""):
  """`obj` with its tensors as arrays; every view checked before it is copied, and all of
  them together held to `budget[0]` bytes (decremented) so a small file cannot ask for
  terabytes through stride-0 or repeated views."""
  if isinstance(obj, _Tensor):
    numel = obj.check(f"{where}: tensor {name or '?'}")
    budget[0] -= numel * obj.storage.dtype.itemsize
    if budget[0] < 0:
      raise DataError(f"{where}: tensor {name}: the tensors hold more values than "
                      f"{MAX_EXPANSION} times the file's bytes; not a plain state dict")
    return obj.to_numpy()
  if isinstance(obj, dict):
    return {k: _materialise(v, where, budget, f"{name}.{k}" if name else str(k))
            for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, where, budget, f"{name}[{i}]") for i, v in enumerate(obj))
  return obj


def _read_legacy(f, where: str) -> Any:
  magic = _NoGlobals(f, where).load()
  if magic != LEGACY_MAGIC:
    raise DataError(f"{where}: not a torch checkpoint (bad magic number)")
  _NoGlobals(f, where).load()  # protocol version
  _NoGlobals(f, where).load()  # system info (endianness, type sizes)
  unpickler = RestrictedUnpickler(f, where)
  result = unpickler.load()
  keys = _NoGlobals(f, where).load()
  for key in keys:
    storage = unpickler.storages.get(str(key))
    if storage is None:
      raise DataError(f"{where}: storage {key} is listed but never used")
    header = f.read(8)
    if len(header) != 8:
      raise DataError(f"{where}: truncated before storage {key}")
    (numel,) = struct.unpack("<q", header)
    left = os.fstat(f.fileno()).st_size - f.tell()
    if numel != storage.numel or not 0 <= numel * storage.dtype.itemsize <= left:
      raise DataError(f"{where}: storage {key} declares {numel} values ({storage.numel} in the "
                      f"pickle), more than the file holds ({left} bytes left) or negative")
    raw = f.read(numel * storage.dtype.itemsize)
    if len(raw) != numel * storage.dtype.itemsize:
      raise DataError(f"{where}: storage {key} has {len(raw)} bytes, expected "
                      f"{storage.numel * storage.dtype.itemsize}")
    storage.array = np.frombuffer(raw, storage.dtype)
  return result


def _read_member(archive: zipfile.ZipFile, name: str, want: int, where: str) -> bytes:
  """The first `want` bytes of member `name`. Torch stores members uncompressed, so one
  that would unpack past the file's own size (a zip bomb) is refused before reading."""
  size = os.path.getsize(archive.filename)
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise DataError(f"{where}: member {name} is missing") from None
  if not 0 <= want <= size or info.file_size > size:
    raise DataError(f"{where}: member {name} declares {max(want, info.file_size)} bytes, "
                    f"more than the file's {size} (torch stores tensors uncompressed)")
  if info.file_size < want:
    raise DataError(f"{where}: member {name} has {info.file_size} bytes, expected {want}")
  with archive.open(info) as member:
    return member.read(want)


def _read_zip(path: str, where: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise DataError(f"{where}: a torch zip checkpoint holds one data.pkl, found {pickles}")
    root = pickles[0][:-len("data.pkl")]
    pickled = _read_member(archive, pickles[0], archive.getinfo(pickles[0]).file_size, where)
    unpickler = RestrictedUnpickler(io.BytesIO(pickled), where)
    result = unpickler.load()
    for key, storage in unpickler.storages.items():
      want = storage.numel * storage.dtype.itemsize
      raw = _read_member(archive, f"{root}data/{key}", want, where)
      storage.array = np.frombuffer(raw, storage.dtype)
  return result


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torch state dict file as {name: NumPy array} (see module doc for what is admitted)."""
  where = str(path)
  try:
    if zipfile.is_zipfile(path):
      result = _read_zip(str(path), where)
    else:
      with open(path, "rb") as f:
        result = _read_legacy(f, where)
  except DataError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, OSError) as e:
    raise DataError(f"{where}: not a readable torch state dict ({e})") from e
  if isinstance(result, dict) and "state_dict" in result and isinstance(result["state_dict"], dict):
    result = result["state_dict"]
  if not isinstance(result, dict):
    raise DataError(f"{where}: holds a {type(result).__name__}, not a state dict")
  out = _materialise(result, where, [MAX_EXPANSION * os.path.getsize(path)])
  return {str(k): np.asarray(v) for k, v in out.items()}
