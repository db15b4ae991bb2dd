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
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from esspr_jax import optim, sharding  # noqa: E402
from esspr_jax.config import compose, validate_config  # noqa: E402
from esspr_jax.config.loss import composed_enabled  # noqa: E402
from esspr_jax.losses import loss_unit, plan_terms  # noqa: E402
from esspr_jax.models import build_model  # noqa: E402
from esspr_jax.models.model import example_side  # noqa: E402
from esspr_jax.train_step import TrainState, train_step  # noqa: E402

MIB = 2**20


def abstract_batch(config, batch_sharding) -> dict:
  """ShapeDtypeStructs of one global batch (and its composed sub-batch if the term is on)."""
  def side(rows):
    return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype, sharding=batch_sharding)
            for k, v in example_side(config.model, 1).items()}
  batch = {"trigger": side(config.train.batch_size), "recall": side(config.train.batch_size)}
  if composed_enabled(config):
    rows = config.train.composed_batch_size
    batch["composed"] = {"trigger": side(rows), "recall": side(rows)}
  return batch


def step_temp_bytes(config) -> int:
  """Temporaries of the compiled step, built the way train.train builds it."""
  validate_config(config)
  tc = config.train
  mesh = sharding.make_mesh(tc, jax.devices()[:1])
  rules = sharding.rules(tc)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  model = build_model(config.model)
  init_side = jax.tree_util.tree_map(jnp.asarray, example_side(config.model, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), init_side)
  logical = sharding.logical_specs(variables["params"])
  params = nn.unbox(variables["params"])
  tx, schedule = optim.make_optimizer(tc, params, logical)
  param_shardings = sharding.mesh_shardings(logical, mesh, rules)
  repl = sharding.replicated(mesh)
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_shardings,
                                        transform_non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=opt_state)
  state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  step = jax.jit(
      functools.partial(train_step, model=model, loss_fn=functools.partial(
          loss_unit, config=config.loss), views=plan_terms(config.loss).views(), tx=tx,
          schedule=schedule, base_rng=jax.random.key(1), logical_rules=rules,
          micro_steps=tc.grad_accum_steps),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, repl),
      donate_argnums=(0,))
  with jax.set_mesh(mesh):
    compiled = step.lower(state, abstract_batch(config, batch_sharding)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


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
