"""models/torch_pickle.py on crafted .pth files: every tensor view is checked against its
storage and the file's size before any memory is touched.

The files are written here, byte for byte as torch lays them out (legacy and zip), with
views torch itself would never write: negative strides/offsets/sizes, views past the
end, huge declarations, a zip bomb. The hostile ones are read in one subprocess under a
memory limit, so a reader that segfaults or allocates terabytes fails the test instead
of taking pytest down.
"""
import collections
import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from esspr_jax.models import torch_pickle

REBUILD = ("torch._utils", "_rebuild_tensor_v2")


class _Global:
  """A global the pickle names by module and name; nothing is imported."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("only pickled, never called")


class _Storage:
  def __init__(self, key, values, numel=None, dtype="FloatStorage"):
    self.key, self.values, self.dtype = key, values, dtype
    self.numel = len(values) if numel is None else numel


class _View:
  """A tensor as `_rebuild_tensor_v2(storage, offset, size, stride, ...)` in the pickle."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride)

  def __reduce__(self):
    return _Global(*REBUILD), (*self.args, False, collections.OrderedDict())


class _Crafter(pickle._Pickler):  # the Python pickler: it lets us write any global
  """Pickles a state dict as torch does; `legacy` storage ids carry a 6th entry (no view)."""
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      pid = ("storage", _Global("torch", obj.dtype), obj.key, "cpu", obj.numel)
      return pid + (None,) if self.legacy else pid
    return None


def _pickled(state_dict, legacy) -> bytes:
  buffer = io.BytesIO()
  _Crafter(buffer, legacy).dump(state_dict)
  return buffer.getvalue()


def _storages(state_dict):
  found = {}
  for view in state_dict.values():
    storage = view.args[0]
    if isinstance(storage, _Storage):
      found[storage.key] = storage
  return list(found.values())


def write_pth(path, state_dict, layout, compress=False):
  """`state_dict` ({name: _View}) as a torch .pth file of `layout` 'legacy' or 'zip'."""
  if layout == "legacy":
    with open(path, "wb") as f:
      for header in (torch_pickle.LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(header, f, protocol=2)
      f.write(_pickled(state_dict, legacy=True))
      storages = _storages(state_dict)
      pickle.dump([s.key for s in storages], f, protocol=2)
      for s in storages:
        f.write(struct.pack("<q", s.numel))
        f.write(np.asarray(s.values, np.float32).tobytes())
    return path
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/version", "3\n")
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/data.pkl", _pickled(state_dict, legacy=False))
    for s in _storages(state_dict):
      z.writestr(f"archive/data/{s.key}", np.asarray(s.values, np.float32).tobytes(),
                 zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
  return path


LAYOUTS = ["legacy", "zip"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_crafted_valid_views_read_as_torch_reads_them(tmp_path, layout):
  storage = _Storage("0", np.arange(12, dtype=np.float32))
  sd = {"t": _View(storage, 1, (3, 2), (1, 4)),  # transposed, offset
        "s": _View(storage, 11, (), ()),  # a scalar at the last value
        "e": _View(storage, 0, (2, 3), (0, 1)),  # expanded (stride 0)
        "z": _View(storage, 12, (0, 4), (4, 1))}  # empty, offset at the end
  path = write_pth(tmp_path / f"{layout}.pth", sd, layout)
  loaded = torch_pickle.load_state_dict(path)
  values = np.arange(12, dtype=np.float32)
  expected = {"t": np.lib.stride_tricks.as_strided(values[1:], (3, 2), (4, 16)),
              "s": np.float32(11), "e": np.tile(values[:3], (2, 1)), "z": np.zeros((0, 4))}
  for name, want in expected.items():
    np.testing.assert_array_equal(loaded[name], want, err_msg=name)
  torch = pytest.importorskip("torch")  # the crafted file is one torch reads the same
  reference = torch.load(path, map_location="cpu", weights_only=True)
  for name, tensor in reference.items():
    np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)


def _one(offset, size, stride, values=np.arange(6), numel=None):
  return {"w": _View(_Storage("0", values, numel), offset, size, stride)}


HOSTILE = {  # name: (state dict, layouts, what the error says)
    "negative_stride_far": (_one(0, (2,), (-(1 << 40),)), LAYOUTS, "negative"),
    "negative_stride_small": (_one(0, (4,), (-1,)), LAYOUTS, "negative"),
    "negative_offset": (_one(-4, (2,), (1,)), LAYOUTS, "negative"),
    "negative_size": (_one(0, (-1,), (1,)), LAYOUTS, "negative"),
    "past_the_end": (_one(0, (7,), (1,)), LAYOUTS, "runs past its storage"),
    "scalar_past_the_end": (_one(6, (), ()), LAYOUTS, "runs past its storage"),
    "rank_mismatch": (_one(0, (2, 3), (1,)), LAYOUTS, "2 sizes but 1 strides"),
    "not_a_number": (_one(0, ("2",), (1,)), LAYOUTS, "not integers"),
    "huge_declaration": (_one(0, (2,), (1,), numel=1 << 40), LAYOUTS, "more than the file"),
    "expanded_to_a_terabyte": (_one(0, (1 << 20, 1 << 20), (0, 0)), LAYOUTS, "more values"),
    "one_storage_viewed_forty_times": (
        {f"w{i}": _View(_Storage("0", np.arange(1000)), 0, (1000,), (1,)) for i in range(40)},
        LAYOUTS, "more values"),
    "zip_bomb": (_one(0, (1 << 24,), (1,), values=np.zeros(1 << 24)), ["zip"],
                 "more than the file"),
}
CASES = [(name, layout) for name, (_, layouts, _) in HOSTILE.items() for layout in layouts]

_READER = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a terabyte ask fails fast
from esspr_jax.errors import DataError
from esspr_jax.models import torch_pickle
for path in sys.argv[1:]:
  try:
    torch_pickle.load_state_dict(path)
    result = ["loaded", ""]
  except DataError as e:
    result = ["DataError", str(e)]
  except Exception as e:
    result = [type(e).__name__, str(e)[:200]]
  print(json.dumps([path, *result]), flush=True)
"""


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory):
  """{(case, layout): (outcome, message)}, read in one subprocess (see module doc)."""
  folder = tmp_path_factory.mktemp("hostile")
  paths = {}
  for name, layout in CASES:
    sd = HOSTILE[name][0]
    paths[name, layout] = write_pth(folder / f"{name}.{layout}.pth", sd, layout,
                                    compress=name == "zip_bomb")
  done = subprocess.run([sys.executable, "-c", _READER, *map(str, paths.values())],
                        capture_output=True, text=True, timeout=300)
  lines = {row[0]: row[1:] for row in map(json.loads, done.stdout.splitlines())}
  return {case: lines.get(str(path), [f"rc {done.returncode}", done.stderr[-300:]])
          for case, path in paths.items()}


@pytest.mark.parametrize("name, layout", CASES)
def test_hostile_views_are_one_error_naming_the_file(hostile_results, name, layout):
  outcome, message = hostile_results[name, layout]
  assert outcome == "DataError", (outcome, message)
  assert f"{name}.{layout}.pth" in message, message
  assert HOSTILE[name][2] in message and "\n" not in message, message
