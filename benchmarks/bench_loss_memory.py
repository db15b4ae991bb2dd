"""Temporary memory of the loss unit's forward+backward, plain vs chunked.

Compiles (does not run) value_and_grad of `loss_unit` with the default terms and reads
XLA's memory analysis, so it prints the figure docs/losses.md quotes:

    python benchmarks/bench_loss_memory.py --batch 4096 --dim 256 --chunks 0,512
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from esspr_jax.config import compose  # noqa: E402
from esspr_jax.losses import loss_unit  # noqa: E402


def temp_mib(batch: int, dim: int, chunk: int) -> float:
  config = compose("demo").loss
  with config.unlocked():
    config.chunk_size = chunk
  side = {m: jax.ShapeDtypeStruct((batch, dim), jnp.float32) for m in "itm"}

  def total(trigger, recall):
    return loss_unit({"trigger": trigger, "recall": recall}, config)[0]

  compiled = jax.jit(jax.value_and_grad(total, argnums=(0, 1))).lower(side, side).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--chunks", default="0,512", help="comma list; 0 = plain")
  args = parser.parse_args()
  rows = [(int(c), temp_mib(args.batch, args.dim, int(c))) for c in args.chunks.split(",")]
  base = rows[0][1]
  print(f"loss unit fwd+bwd temporaries, B={args.batch}, E={args.dim}, default terms")
  print("| chunk_size | temp MiB | vs first |\n|---|---|---|")
  for chunk, mib in rows:
    print(f"| {chunk or 'plain'} | {mib:.0f} | {mib / base:.3f}x |")


if __name__ == "__main__":
  main()
