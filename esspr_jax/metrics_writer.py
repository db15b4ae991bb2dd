"""Where training metrics go: JSON lines, TensorBoard events, a console progress line.

Only the primary process writes (`distributed.is_primary`). The FLOPs/MFU
helpers are pure so they can be tested against hand-computed numbers.
"""
import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Mapping

import jax

log = logging.getLogger(__name__)

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


def peak_flops_per_device(configured: float, device_kind: str) -> float | None:
  """The configured peak, else the table's entry for `device_kind`, else None."""
  if configured > 0:
    return float(configured)
  if device_kind in PEAK_FLOPS_BY_DEVICE_KIND:
    return PEAK_FLOPS_BY_DEVICE_KIND[device_kind]
  for kind, peak in PEAK_FLOPS_BY_DEVICE_KIND.items():
    if device_kind.startswith(kind):
      return peak
  return None


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the mesh's peak FLOP/s."""
  if not peak_per_device or not flops_per_step or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (num_devices * peak_per_device)


def compiled_flops(lowered) -> float | None:
  """FLOPs of one step as XLA counts them in the unpartitioned program (global)."""
  try:
    cost = lowered.cost_analysis()
  except Exception as e:  # some backends do not implement it
    log.info("no cost analysis available: %s", e)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def progress_line(step: int, total: int, metrics: Mapping[str, float],
                  seconds_per_step: float) -> str:
  """One console line: step, percent, ETA, then a few key metrics."""
  eta = format_duration((total - step) * seconds_per_step)
  parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.0f}%)", f"eta {eta}"]
  for key in ("loss", "lr", "grad_norm", "examples_per_sec", "mfu"):
    if key in metrics and metrics[key] is not None:
      value = metrics[key]
      parts.append(f"{key} {value:.3g}" if key != "examples_per_sec" else f"ex/s {value:.1f}")
  return " | ".join(parts)


class MetricsWriter:
  """Writes `metrics.jsonl` and TensorBoard events under `workdir`, prints progress."""

  def __init__(self, workdir: str | os.PathLike, total_steps: int, enabled: bool = True,
               console=sys.stdout):
    self.enabled = enabled
    self.total_steps = total_steps
    self.console = console
    self.jsonl_path = pathlib.Path(workdir) / "metrics.jsonl"
    self.tensorboard_dir = pathlib.Path(workdir) / "tensorboard"
    self._jsonl = None
    self._tb = None
    if enabled:
      import tensorboardX  # noqa: PLC0415  (heavy; only the primary process needs it)
      self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(str(self.tensorboard_dir))

  def write(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    record = {"step": step, "kind": kind, "time": time.time(),
              **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(f"{kind}/{key}", value, step)
    self._tb.flush()

  def progress(self, step: int, metrics: Mapping[str, float], seconds_per_step: float) -> None:
    if self.enabled:
      print(progress_line(step, self.total_steps, metrics, seconds_per_step),
            file=self.console, flush=True)

  def say(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.console, flush=True)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._tb:
      self._tb.close()
      self._tb = None


def device_kind() -> str:
  return jax.devices()[0].device_kind
