"""What the compiler says about a step: memory per device, fit against HBM, collectives.

Pure functions over XLA's own reports (`compiled.memory_analysis()`, the optimized HLO
text), shared by the trainer (a fit check before the first step) and `--mode=compile`
(compile_check.py). A step that does not fit stops with one line naming the config keys
that trade memory: `DoesNotFitError`, a ConfigError, so the CLI exits 2.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time

from esspr_jax import hardware
from esspr_jax.errors import ConfigError

GiB = hardware.GiB
# The keys that trade memory per device for FLOPs, batch or communication.
MEMORY_KEYS = ("model.remat", "model.remat_policy", "train.batch_size",
               "train.grad_accum_steps", "train.mesh.fsdp")
# Collective ops in optimized HLO; an async pair (-start/-done) counts once, at -done.
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
_INSTRUCTION = re.compile(
    r"=\s*(?P<shape>.*?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<suffix>-start|-done)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subf]\d+|bf16|f8\w*|c64|c128)\[(?P<dims>[\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


class DoesNotFitError(ConfigError):
  """The compiled step needs more memory per device than the device has."""

  def __init__(self, what: str, detail: str, config):
    now = ", ".join(f"{key}={_get(config, key)!r}" for key in MEMORY_KEYS
                    if _get(config, key) is not None)
    super().__init__("train", f"{what} does not fit: {detail}; change one of "
                     f"{', '.join(MEMORY_KEYS)} (now {now})")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "get") or part not in node:
      return None
    node = node[part]
  return node


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device of a compiled program, as XLA planned them."""
  arguments: int
  outputs: int
  aliased: int  # outputs that reuse donated argument buffers
  temporaries: int
  code: int

  @classmethod
  def of(cls, compiled) -> "Memory | None":
    try:
      stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (a backend without memory analysis)
      return None
    if stats is None:
      return None
    return cls(arguments=int(stats.argument_size_in_bytes),
               outputs=int(stats.output_size_in_bytes),
               aliased=int(stats.alias_size_in_bytes),
               temporaries=int(stats.temp_size_in_bytes),
               code=int(stats.generated_code_size_in_bytes))

  @property
  def total(self) -> int:
    """Peak bytes the program holds: inputs, outputs not written in place, scratch."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def device_hbm(device) -> int | None:
  """HBM XLA may use on an accelerator; None for a CPU (no fit to check)."""
  if device.platform == "cpu":
    return None
  return hardware.hbm_bytes(device)


def compile_lowered(lowered, config, what: str):
  """(compiled, seconds); the compiler's out-of-memory verdict becomes DoesNotFitError."""
  start = time.time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; its type moves between jaxlib versions
    text = str(e)
    if "Couldn't find output tile sizes" in text:  # XLA:GPU with no GPU to autotune on
      raise ConfigError("flags", f"compiling {what} for a GPU with no GPU attached needs "
                        "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (Triton's matmul "
                        "tiles are chosen by autotuning on a device)") from None
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    first = next((line.strip() for line in text.splitlines() if "exceeds" in line
                  or "Ran out of memory" in line), text.splitlines()[0])
    raise DoesNotFitError(what, f"the compiler ran out of device memory ({first[:300]})",
                          config) from None
  return compiled, time.time() - start


def check_fit(memory: Memory | None, hbm: int | None, config, what: str) -> None:
  """Raises DoesNotFitError when `memory` exceeds `hbm` (nothing to check if either is
  unknown: a CPU, or a backend without memory analysis)."""
  if memory is None or not hbm or memory.total <= hbm:
    return
  raise DoesNotFitError(what, f"it needs {memory.total / GiB:.2f} GiB per device "
                        f"(temporaries {memory.temporaries / GiB:.2f} GiB) of "
                        f"{hbm / GiB:.2f} GiB", config)


def array_sizes(shape_text: str) -> list[tuple[int, int]]:
  """(elements, bytes) of every array in an HLO shape ('f32[8,4]{1,0}' or a tuple)."""
  out = []
  for match in _ARRAY.finditer(shape_text):
    dims = [int(d) for d in match["dims"].split(",") if d]
    dtype = match["dtype"]
    width = _DTYPE_BYTES.get(dtype) or max(1, int(re.match(r"[a-z]+(\d+)", dtype)[1]) // 8)
    elements = math.prod(dims)
    out.append((elements, elements * width))
  return out


def collectives(hlo_text: str) -> list[dict]:
  """Every collective of an optimized HLO module: {'op', 'elements', 'bytes'} of the
  array(s) it produces (an async pair once, with the shape its -done returns)."""
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.search(line)
    if not match or match["suffix"] == "-start":
      continue
    sizes = array_sizes(match["shape"])
    found.append({"op": match["op"], "elements": max((e for e, _ in sizes), default=0),
                  "bytes": sum(b for _, b in sizes)})
  return found


def collective_summary(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {'count', 'bytes'}} over the module (bytes produced per device)."""
  summary: dict[str, dict[str, int]] = {}
  for c in collectives(hlo_text):
    entry = summary.setdefault(c["op"], {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += c["bytes"]
  return summary
