"""Per-device temporary memory of the loss unit's forward+backward, by device count.

Compiles (does not run) value_and_grad of `loss_unit` the way the train step traces
it -- inside `jax.set_mesh` and the logical axis rules, every side's batch dim split
over the mesh's `data` axis -- and reads XLA's `memory_analysis()` per device, for
1, 2, 4 and 8 devices x plain/chunked scores x one row per term kind:

    python benchmarks/bench_loss_memory.py --batch 4096 --dim 256 --chunk 512 --baseline

Rows (docs/losses.md says what each means): `hinge` (ppm/m-m alone), `infonce`
(infonce/m-m), `sigmoid` (sigmoid/m-m), `locality` (plc/t: PLC's top-k), `composed`
(ppm/m-m plus the composed-query term on its own sub-batch of --composed-batch rows;
compare with the hinge row), and `demo preset` (the demo's terms: the paper's seven
plus the composed term). `--baseline` adds a column with the loss on 8 devices
forced onto the whole-batch formulation (`batch_axes=()`: XLA partitions the global
[B, B] scores as it likes), which is how the loss ran before it split its rows.
Virtual CPU devices stand in for chips: the figures are XLA's buffer plan per device.
"""
import argparse
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from esspr_jax import sharding  # noqa: E402
from esspr_jax.config import compose  # noqa: E402
from esspr_jax.config.train import MESH_AXES  # noqa: E402
from esspr_jax.losses import loss_unit  # noqa: E402

DEVICE_COUNTS = (1, 2, 4, 8)


def _only(config, *, pair=None, kind="hinge", plc=None, composed=False):
  """The loss section with exactly one pair (or PLC view) on, and the composed term."""
  for entry in config.pairs.values():
    entry.weight = 0.0
  for view in ("t", "i"):
    config.pdc[view].weight = 0.0
    config.plc[view].weight = 0.0
  if pair:
    config.pairs[pair].update(kind=kind, weight=1.0)
  if plc:
    config.plc[plc].weight = 1.0
  config.composed.weight = 0.1 if composed else 0.0


ROWS = {
    "hinge": dict(pair="m_m", kind="hinge"),
    "infonce": dict(pair="m_m", kind="infonce"),
    "sigmoid": dict(pair="m_m", kind="sigmoid"),
    "locality": dict(plc="t"),
    "composed": dict(pair="m_m", kind="hinge", composed=True),
    "demo preset": None,
}


def loss_config(row: str, chunk: int):
  config = compose("demo").loss
  with config.unlocked():
    if ROWS[row] is not None:
      _only(config, **ROWS[row])
    config.chunk_size = chunk
  return config


def temp_mib(config, devices: int, batch: int, composed_batch: int, dim: int,
             split_rows: bool = True) -> float:
  mesh = jax.make_mesh((devices, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:devices])
  rules = sharding.rules(compose("demo").train)
  rows = sharding.batch_sharding(mesh, rules)
  side = lambda n, views: {m: jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=rows)
                           for m in views}
  sides = {"trigger": side(batch, "itm"), "recall": side(batch, "itm")}
  if config.composed.weight > 0:
    sides["composed_trigger"] = side(composed_batch, "im")
    sides["composed_recall"] = side(composed_batch, "m")
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  extra = {} if split_rows else {"batch_axes": ()}

  def total(sides, scale, bias):
    return loss_unit(sides, config, logit_scale=scale, logit_bias=bias, **extra)[0]

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2))).lower(
        sides, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--composed-batch", type=int, default=256,
                      help="composed sub-batch rows (the base preset's figure)")
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=512, help="loss.chunk_size of 'chunked'")
  parser.add_argument("--rows", default=",".join(ROWS), help="comma list of rows")
  parser.add_argument("--baseline", action="store_true",
                      help="add 8 devices with the whole-batch formulation")
  args = parser.parse_args()
  if len(jax.devices()) < max(DEVICE_COUNTS):
    raise SystemExit(f"needs {max(DEVICE_COUNTS)} devices, found {len(jax.devices())}")
  header = ["term", "scores"] + [f"{n} dev" for n in DEVICE_COUNTS] + ["8 vs 1"]
  if args.baseline:
    header += ["8 dev whole-batch (before)"]
  print(f"loss unit fwd+bwd temporaries per device (MiB), B={args.batch}, "
        f"composed B={args.composed_batch}, E={args.dim}, batch over `data`")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in args.rows.split(","):
    for chunk in (0, args.chunk):
      config = loss_config(row, chunk)
      mib = [temp_mib(config, n, args.batch, args.composed_batch, args.dim)
             for n in DEVICE_COUNTS]
      cells = [row, f"chunk {chunk}" if chunk else "plain"]
      cells += [f"{m:.2f}" for m in mib] + [f"{mib[-1] / mib[0]:.3f}x"]
      if args.baseline:
        cells.append(f"{temp_mib(config, 8, args.batch, args.composed_batch, args.dim, False):.2f}")
      print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
