"""Compiled temporary memory of the demo training step vs gradient-accumulation steps.

Gradient caching (esspr_jax/train_step.py) keeps the whole global batch as negatives
and holds one micro-batch's activations at a time, so the step's temporaries should
fall with k while its result does not change. This lowers and compiles (never runs)
the full step as train.py jits it (embed, loss, gradients, AdamW update; abstract
inputs only) and prints XLA's `memory_analysis().temp_size_in_bytes` per k, with the
loss unit's own forward+backward on the full [B, E] embeddings for comparison:

    python benchmarks/bench_accum_memory.py --preset demo --batch 1024 --steps 1,2,4,8
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from esspr_jax import batch_layout, train  # noqa: E402
from esspr_jax.config import compose, validate_config  # noqa: E402
from esspr_jax.config.loss import composed_enabled  # noqa: E402
from esspr_jax.losses import loss_unit, plan_terms  # noqa: E402

MIB = 2**20


def step_temp_bytes(config) -> int:
  """Temporaries of the compiled step: the trainer's own plan (train.plan_step) on one
  device, for an abstract global batch (batch_layout.py)."""
  validate_config(config)
  model, loss_fn, views = train.default_model_and_loss(config)
  composed = config.train.composed_batch_size if composed_enabled(config) else 0
  batch = batch_layout.abstract_train_batch(config, config.train.batch_size, composed)
  plan = train.plan_step(config, model, loss_fn, views, batch, jax.devices()[:1])
  return plan.lowered.compile().memory_analysis().temp_size_in_bytes


def loss_temp_bytes(config) -> int:
  """Temporaries of the loss unit's forward+backward alone on the full-batch embeddings."""
  views = plan_terms(config.loss).views()
  rows = lambda side: (config.train.composed_batch_size if side.startswith("composed")
                       else config.train.batch_size)
  sides = {side: {m: jax.ShapeDtypeStruct((rows(side), config.model.embed_dim), jnp.float32)
                  for m in modalities} for side, modalities in views.items()}
  scalar = jax.ShapeDtypeStruct((), jnp.float32)

  def total(sides, logit_scale, logit_bias):
    return loss_unit(sides, config.loss, logit_scale=logit_scale, logit_bias=logit_bias)[0]

  compiled = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2))).lower(
      sides, scalar, scalar).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--preset", default="demo")
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--steps", default="1,2,4,8", help="comma list of grad_accum_steps")
  args = parser.parse_args()
  config = compose(args.preset)
  config.train.batch_size = args.batch
  rows = []
  for k in (int(s) for s in args.steps.split(",")):
    config.train.grad_accum_steps = k
    rows.append((k, step_temp_bytes(config)))
  base = rows[0][1]
  loss = loss_temp_bytes(config)
  print(f"{args.preset} train step (embed + loss + grads + AdamW), global batch {args.batch}"
        f" (composed sub-batch {config.train.composed_batch_size if composed_enabled(config) else 0}),"
        f" 1 {jax.devices()[0].platform} device, compiled temporaries")
  print(f"| grad_accum_steps | micro-batch | temp MiB | vs k={rows[0][0]} |\n|---|---|---|---|")
  for k, temp in rows:
    print(f"| {k} | {args.batch // k} | {temp / MIB:.1f} | {base / temp:.2f}x less |")
  print(f"loss unit alone (fwd+bwd on the full [{args.batch}, {config.model.embed_dim}] "
        f"embeddings): {loss / MIB:.1f} MiB")


if __name__ == "__main__":
  main()
