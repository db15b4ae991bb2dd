"""Where training metrics go: JSON lines, TensorBoard events, a console progress line.

Only the primary process writes (`distributed.is_primary`). The FLOPs/MFU
helpers are pure so they can be tested against hand-computed numbers.

A local workdir gets `metrics.jsonl` appended line by line and TensorBoard events
flushed at every write, as before. Objects in a bucket (gs://) cannot be appended to, so
for a remote workdir the writer reads the existing `metrics.jsonl` once at start (rows of
earlier runs of this workdir), keeps the whole log in memory, and uploads it as one
object (`atomic_io.upload`) at each sync: after every checkpoint save (train.py calls
`flush()`), after every eval row, at most every `sync_every_s` seconds in between, and
at close. A run killed between syncs loses only rows after its last checkpoint, which
the resumed run logs again. TensorBoard events go to a local temp dir and the changed
event files are uploaded whole at the same points (event_files.TensorBoard).
"""
import io
import json
import logging
import math
import os
import sys
import time
from typing import Mapping

import jax
from etils import epath

from esspr_jax import atomic_io
from esspr_jax import hlo_flops
from esspr_jax import jsonl
from esspr_jax.event_files import TensorBoard
from esspr_jax.hardware import PEAK_FLOPS_BY_DEVICE_KIND, peak_flops_per_device  # noqa: F401

log = logging.getLogger(__name__)


def utilisation(flops_per_step: float | None, step_seconds: float, num_devices: int,
                peak_per_device: float | None) -> float | None:
  """Achieved FLOP/s over the mesh's peak FLOP/s: MFU with model FLOPs, HFU with the
  FLOPs the compiled program executes."""
  if not peak_per_device or not flops_per_step or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (num_devices * peak_per_device)


def executable_flops(compiled, num_devices: int,
                     hlo_text: str | None = None) -> float | None:
  """FLOPs one step executes on the whole mesh: one device's compiled (partitioned)
  program times the devices. Counts what the hardware runs, remat recomputation and
  gradient caching's second forward included: its matmuls and convolutions with every
  loop's trip count (hlo_flops.py; XLA's cost analysis counts a scanned layer stack's
  body once), else XLA's cost analysis. None when neither is available. `hlo_text`:
  the optimized module when the caller has it already (it can be large)."""
  flops = None
  try:
    flops = hlo_flops.matmul_flops(hlo_text if hlo_text is not None else compiled.as_text())
  except Exception as e:  # noqa: BLE001  (a backend without HLO text)
    log.info("no optimized HLO to count: %s", e)
  if flops is None:
    flops = _cost_analysis_flops(compiled)
    if flops is not None:
      log.warning("counting the step's FLOPs with XLA's cost analysis, which counts each "
                  "loop body once (hlo_flops.py could not read a trip count): hfu is low "
                  "for scanned models")
  return flops * num_devices if flops else None


def _cost_analysis_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception as e:  # noqa: BLE001  (some backends do not implement it)
    log.info("no cost analysis available: %s", e)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or not cost.get("flops") or cost["flops"] <= 0:
    return None
  return float(cost["flops"])


def interval_metrics(sums: Mapping[str, float], steps: int, seconds: float, *,
                     batch_size: int, flops_per_step: float | None, num_devices: int,
                     peak_per_device: float | None,
                     model_flops_per_step: float | None = None) -> dict[str, float]:
  """What a log row says about `steps` steps that took `seconds` in all: each metric's
  mean (from its sum), the step time and throughput, and FLOP rates where known:
  `mfu` from the model's FLOPs (model_flops.py), `hfu` from the compiled program's."""
  step_seconds = seconds / steps
  out = {k: v / steps for k, v in sums.items()}
  out["step_seconds"] = step_seconds
  out["examples_per_sec"] = batch_size / step_seconds
  if flops_per_step:
    out["flops_per_step"] = flops_per_step
    out["tflops_per_device"] = flops_per_step / step_seconds / num_devices / 1e12
    out["hfu"] = utilisation(flops_per_step, step_seconds, num_devices, peak_per_device)
  if model_flops_per_step:
    out["model_flops_per_step"] = model_flops_per_step
    out["mfu"] = utilisation(model_flops_per_step, step_seconds, num_devices, peak_per_device)
  return out


class IntervalMeter:
  """Times log intervals and averages them (`interval_metrics`): `read(sums, steps)`
  at a log step returns the row for the steps since the previous one."""

  def __init__(self, *, batch_size: int, flops_per_step: float | None, num_devices: int,
               peak_per_device: float | None, model_flops_per_step: float | None = None,
               clock=time.perf_counter):
    self._rates = dict(batch_size=batch_size, flops_per_step=flops_per_step,
                       num_devices=num_devices, peak_per_device=peak_per_device,
                       model_flops_per_step=model_flops_per_step)
    self._clock = clock
    self._start = clock()

  def read(self, sums: Mapping[str, float], steps: int) -> dict[str, float]:
    now = self._clock()
    row = interval_metrics(sums, steps, now - self._start, **self._rates)
    self._start = now
    return row


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


# Remote workdirs: the longest stretch between two uploads of metrics and events.
SYNC_EVERY_S = 60.0


class _ObjectLog:
  """A text log kept whole in memory and uploaded as one object at each flush (object
  stores cannot append). Starts from the object's current content."""

  def __init__(self, url: str):
    self.url = url
    self._buffer = io.StringIO()
    existing = atomic_io.download(url)
    if existing:
      text = existing.decode("utf-8")
      self._buffer.write(jsonl.repaired(text))
    self._dirty = False

  def write(self, text: str) -> None:
    self._buffer.write(text)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      atomic_io.upload(self.url, self._buffer.getvalue().encode("utf-8"))
      self._dirty = False

  def close(self) -> None:
    self.flush()


class MetricsWriter:
  """Writes `metrics.jsonl` and TensorBoard events under `workdir`, prints progress."""

  def __init__(self, workdir: str | os.PathLike, total_steps: int, enabled: bool = True,
               console=sys.stdout, sync_every_s: float = SYNC_EVERY_S):
    self.enabled = enabled
    self.total_steps = total_steps
    self.console = console
    self.remote = atomic_io.is_remote(workdir)
    self.sync_every_s = sync_every_s
    self.jsonl_path = epath.Path(workdir) / "metrics.jsonl"
    self.tensorboard_dir = epath.Path(workdir) / "tensorboard"
    self._jsonl = None
    self._tb = None
    self._synced_at = time.monotonic()
    if enabled:
      if self.remote:
        self._jsonl = _ObjectLog(os.fspath(self.jsonl_path))
      else:
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = jsonl.AppendLog(self.jsonl_path)  # whole lines only
      self._tb = TensorBoard(self.tensorboard_dir)

  def write(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    record = {"step": step, "kind": kind, "time": time.time(),
              **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for key, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(f"{kind}/{key}", value, step)
    if not self.remote or kind != "train" or (
        time.monotonic() - self._synced_at >= self.sync_every_s):
      self.flush(strict=False)

  def flush(self, strict: bool = False) -> None:
    """Everything written so far reaches the workdir (remote: uploads metrics.jsonl and
    the changed event files). A failed upload is logged and retried at the next flush,
    unless `strict`."""
    if not self.enabled or self._jsonl is None:
      return
    try:
      self._jsonl.flush()
      self._tb.flush()
    except Exception as e:  # noqa: BLE001  (a network hiccup must not stop training)
      if strict or not self.remote:
        raise
      log.warning("could not upload metrics to %s (retrying at the next sync): %s",
                  self.jsonl_path.parent, e)
      return
    self._synced_at = time.monotonic()

  def progress(self, step: int, metrics: Mapping[str, float], seconds_per_step: float) -> None:
    if self.enabled:
      print(progress_line(step, self.total_steps, metrics, seconds_per_step),
            file=self.console, flush=True)

  def say(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.console, flush=True)

  def close(self) -> None:
    """Final sync (a failed upload raises here) and close."""
    try:
      if self._jsonl:
        self._jsonl.close()
      if self._tb:
        self._tb.close()
    finally:
      self._jsonl = None
      self._tb = None


def device_kind() -> str:
  return jax.devices()[0].device_kind
