"""Devices of a named topology, for compiling a step ahead of time (compile_check.py).

`v5e:4x8`, `v4:2x2x2`, `v5p:2x2x4`, `v6e:16x16`, ... are compile-only TPU devices that
libtpu describes without a TPU attached (`jax.experimental.topologies`): XLA:TPU then
compiles, plans memory and inserts collectives exactly as on the slice. `cpu:N` is N
virtual CPU devices, the same code path without libtpu. `h100:N` is N compile-only
H100s of one node (XLA's GPU compiler, from `esspr-jax[cuda12]`'s plugin, told the
card by gpu_targets/h100_sxm.txtpb); it needs JAX_PLATFORMS=cpu on a machine without
a GPU, or the plugin stops at its CUDA driver check.

libtpu lets one process at a time hold it (a lock file); compile-only use is safe to
share, so ALLOW_MULTIPLE_LIBTPU_LOAD=1 is set unless the caller chose otherwise.
"""
from __future__ import annotations

import os
import pathlib
import re

import jax
from jax._src import xla_bridge

from esspr_jax.errors import ConfigError

_CPU = re.compile(r"^cpu:(\d+)$")
_GPU = re.compile(r"^(?P<card>h100):(?P<count>\d+)$")
GPU_TARGETS = {"h100": "h100_sxm.txtpb"}
# Chips with two TensorCores that JAX drives as one device ("megacore"); libtpu's
# topology otherwise lists each core, and meshes need one device per chip.
_MEGACORE = ("v4", "v5p")


def cpu_count(name: str) -> int | None:
  """N for 'cpu:N', else None."""
  match = _CPU.match(name)
  return int(match[1]) if match else None


def reserve_cpu_devices(name: str) -> None:
  """Before JAX starts its backends: make `cpu:N` devices exist in this process."""
  n = cpu_count(name)
  if n is None or xla_bridge.backends_are_initialized():
    return
  if n > jax.config.jax_num_cpu_devices and "xla_force_host_platform_device_count" not in \
      os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", n)


def devices(name: str) -> list:
  """The devices of topology `name` (see module doc); ConfigError for a name
  nothing knows, or a TPU topology without libtpu installed."""
  n = cpu_count(name)
  if n is not None:
    if n < 1:
      raise ConfigError("flags", f"--topology={name}: needs at least one device")
    reserve_cpu_devices(name)
    found = jax.devices("cpu")
    if len(found) < n:
      raise ConfigError("flags", 
          f"--topology={name}: this process has {len(found)} CPU devices (JAX started "
          f"before they could be set); start with XLA_FLAGS="
          f"--xla_force_host_platform_device_count={n}")
    return list(found[:n])
  gpu = _GPU.match(name)
  if gpu:
    return _gpu_devices(name, gpu["card"], int(gpu["count"]))
  if ":" not in name:
    raise ConfigError("flags", f"--topology={name}: expected 'cpu:N' or a TPU slice such as "
                           "'v5e:4x8', 'v4:2x2x2', 'v5p:2x2x4'")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu: only for TPU names)
  chip = {"chip_config_name": "megacore"} if name.split(":")[0] in _MEGACORE else {}
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             **chip).devices)
  except Exception as e:  # noqa: BLE001  (JaxRuntimeError, or no TPU plugin at all)
    text = " ".join(str(e).split())
    if "tpu" in text.lower() and ("not found" in text.lower() or "unknown backend" in
                                   text.lower() or "no plugin" in text.lower()):
      raise ConfigError("flags", f"--topology={name}: compiling for TPU needs libtpu; install "
                             "esspr-jax[tpu] (`pip install -e '.[tpu]'`)") from None
    raise ConfigError("flags", f"--topology={name}: libtpu cannot describe it ({text[:200]})") \
        from None


def _gpu_devices(name: str, card: str, count: int) -> list:
  """`count` compile-only GPUs of one node (module doc)."""
  from jax.experimental import topologies  # noqa: PLC0415  (probes the CUDA plugin)
  target = (pathlib.Path(__file__).parent / "gpu_targets" / GPU_TARGETS[card]).read_text()
  try:
    return list(topologies.get_topology_desc(platform="cuda", target_config=target,
                                             topology=f"1x1x{count}").devices)
  except Exception as e:  # noqa: BLE001  (NotImplementedError without the plugin, ...)
    text = " ".join(str(e).split())
    raise ConfigError("flags", f"--topology={name}: compiling for GPUs needs the CUDA plugin "
                      f"(pip install -e '.[cuda12]') and, without a GPU, JAX_PLATFORMS=cpu "
                      f"({type(e).__name__}: {text[:200]})") from None
