"""Test-wide setup: 8 virtual CPU devices (sharding tests need a mesh), a compilation
cache for this session, and the shared data dir."""
import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (compile-only TPU devices, tests/test_compile_check.py) lets one process hold
# it unless told that compile-only sharing is fine; test subprocesses may load it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Many tests train the same tiny programs, each train() call compiling them anew;
# a persistent cache private to this session (and its worker subprocesses, which
# inherit the variable) compiles each once. Fresh every session: nothing stale.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="esspr-jax-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not SHARED_DATA.is_dir():
    pytest.skip(f"../shared/data not found at {SHARED_DATA}")
  return SHARED_DATA
