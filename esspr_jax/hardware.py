"""What one accelerator chip offers: dense peak FLOP/s and HBM, by JAX `device_kind`.

Pure tables and look-ups, used for MFU/HFU (metrics_writer.py) and for the memory fit
check of a compiled step (compile_report.py). A kind is matched exactly first, then by
prefix ("TPU v5 lite" also matches "TPU v5 litepod"); unknown kinds give None, and the
callers then say so instead of guessing.
"""
from __future__ import annotations

import os
from typing import Mapping

GiB = 1024 ** 3

# Dense peak FLOP/s of one device at the precision training uses on it (bf16 on
# accelerators). Used for MFU when config.train.peak_flops is 0.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}

# HBM of one device as XLA may use it. The TPU figures are the limits XLA:TPU itself
# reports when a program does not fit ("exceeds available HBM (15.75G)" on v5e), i.e.
# the chip's HBM less what the runtime reserves; GPUs list the card's memory (XLA's
# client takes a fraction of it, docs/performance.md). A live device's
# `memory_stats()['bytes_limit']` wins over this table (hbm_bytes).
HBM_BYTES_BY_DEVICE_KIND = {
    "TPU v4": int(30.75 * GiB),
    "TPU v5 lite": int(15.75 * GiB),
    "TPU v5e": int(15.75 * GiB),
    "TPU v5p": int(95.74 * GiB),
    "TPU v5": int(95.74 * GiB),
    "TPU v6 lite": int(31.25 * GiB),
    "TPU v6e": int(31.25 * GiB),
    "NVIDIA A100-SXM4-40GB": 40 * 10 ** 9,
    "NVIDIA A100-SXM4-80GB": 80 * 10 ** 9,
    "NVIDIA H100 80GB HBM3": 84_978_434_048,  # what the card reports to CUDA
    "NVIDIA H100": 84_978_434_048,
    "NVIDIA H200": 141 * 10 ** 9,
}


def lookup(table: Mapping[str, float], device_kind: str):
  """`table[device_kind]`, else the first entry `device_kind` starts with, else None."""
  if device_kind in table:
    return table[device_kind]
  for kind, value in table.items():
    if device_kind.startswith(kind):
      return value
  return None


def peak_flops_per_device(configured: float, device_kind: str) -> float | None:
  """The configured peak, else the table's entry for `device_kind`, else None."""
  if configured > 0:
    return float(configured)
  return lookup(PEAK_FLOPS_BY_DEVICE_KIND, device_kind)


# XLA's GPU client takes this fraction of a card's memory unless told otherwise.
GPU_CLIENT_MEMORY_FRACTION = 0.75


def hbm_bytes(device) -> int | None:
  """Memory XLA may use on `device`: the runtime's own limit where a live device
  reports one, else the table's entry for its kind (for a GPU, the share XLA's client
  takes: XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75), else None (e.g. a CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (compile-only and CPU devices have no stats)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  card = lookup(HBM_BYTES_BY_DEVICE_KIND, device.device_kind)
  if card is None or device.platform not in ("gpu", "cuda", "rocm"):
    return card
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                  GPU_CLIENT_MEMORY_FRACTION))
  return int(card * fraction)
