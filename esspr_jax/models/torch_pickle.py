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
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from esspr_jax.errors import DataError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
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
  """What `_rebuild_tensor_v2` describes; materialised once the storages are read."""

  def __init__(self, storage, offset, size, stride, *unused):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(size), tuple(stride)

  def to_numpy(self) -> np.ndarray:
    data = self.storage.array
    if data is None:
      raise DataError(f"storage {self.storage.key} was never read")
    if not self.size:
      return data[self.offset].copy()
    needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n)
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, data.dtype)
    if needed > data.size:
      raise DataError(f"tensor of size {self.size} runs past its storage ({data.size} values)")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=[s * item for s in self.stride],
        writeable=False)
    return np.array(view)  # a compact copy


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


def _materialise(obj):
  if isinstance(obj, _Tensor):
    return obj.to_numpy()
  if isinstance(obj, dict):
    return {k: _materialise(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
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
    raw = f.read(numel * storage.dtype.itemsize)
    if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
      raise DataError(f"{where}: storage {key} has {len(raw)} bytes, expected "
                      f"{storage.numel * storage.dtype.itemsize}")
    storage.array = np.frombuffer(raw, storage.dtype)
  return result


def _read_zip(path: str, where: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise DataError(f"{where}: a torch zip checkpoint holds one data.pkl, found {pickles}")
    root = pickles[0][:-len("data.pkl")]
    unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), where)
    result = unpickler.load()
    for key, storage in unpickler.storages.items():
      raw = archive.read(f"{root}data/{key}")
      if len(raw) < storage.numel * storage.dtype.itemsize:
        raise DataError(f"{where}: storage {key} is shorter than its {storage.numel} values")
      storage.array = np.frombuffer(raw[:storage.numel * storage.dtype.itemsize], storage.dtype)
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
  out = _materialise(result)
  return {str(k): np.asarray(v) for k, v in out.items()}
