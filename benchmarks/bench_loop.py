"""Step-loop overhead: how much longer the training loop takes than its compiled steps.

    python benchmarks/bench_loop.py                      # demo model, 40 steps, log_every=20
    python benchmarks/bench_loop.py --steps=100 --alone_repeats=20

    overhead = 1 - N x (compiled step time, measured alone) / (wall time of N loop steps)

The model, loss, optimizer and batch size are the `demo` preset's (only steps and
logging change); the data is in memory (a few distinct host batches, repeated), so
the figure is the loop's own cost: building and sending each global batch, reading
metrics, checkpoint and preemption checks, the host waiting for the devices.

"Measured alone": the very compiled program the loop runs (train.set_up's step),
called back to back on one batch already on the devices. It is timed before, between
and after the two loops, and each loop is compared with the mean of the two timings
around it (the machine is shared and its speed drifts). The step compiles once (a
persistent compilation cache in the run's temp dir serves the other set-ups).
"Loop": the real `train.train` with that config, `sync_loop` True (the loop before it
was asynchronous: metrics read every step, batches built inline, preemption agreed
every step) and False (the default). Its wall time is the logged step time of the
log intervals after the first (the first holds compilation's aftermath and the
first checkpoint save).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from esspr_jax import sharding, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402
from esspr_jax.config.loss import composed_enabled  # noqa: E402


def _side(rng, rows: int, config) -> dict:
  size, max_len = config.model.image.size, config.model.tokenizer.max_len
  vocab = config.model.tokenizer.vocab_size
  lengths = rng.integers(3, max_len + 1, size=rows)
  mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int32)
  return {"image": rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8),
          "text_ids": (rng.integers(5, vocab, (rows, max_len)) * mask).astype(np.int32),
          "text_mask": mask, "text_empty": np.zeros(rows, bool)}


def host_batches(config, count: int = 4) -> list[dict]:
  """`count` distinct batches in the pipeline's layout (what pipeline.Collate makes)."""
  rng = np.random.default_rng(0)
  rows, out = config.train.batch_size, []
  for _ in range(count):
    batch = {"trigger": _side(rng, rows, config), "recall": _side(rng, rows, config),
             "valid": np.ones(rows, bool)}
    if composed_enabled(config):
      composed = config.train.composed_batch_size
      batch["composed"] = {"trigger": _side(rng, composed, config),
                           "recall": _side(rng, composed, config)}
    out.append(batch)
  return out


def bench_config(steps: int, log_every: int, sync_loop: bool):
  config = compose("demo")
  config.train.steps = steps
  config.train.log_every = log_every
  config.train.schedule.warmup_steps = min(config.train.schedule.warmup_steps, steps)
  config.train.checkpoint.every = 10 * steps  # only the first save, in the first interval
  config.train.eval_at_end = False
  config.eval.every_steps = 0
  config.train.sync_loop = sync_loop
  return config


def step_alone_seconds(config, batches: list[dict], repeats: int) -> float:
  """Seconds per call of the loop's compiled step, back to back on a device batch."""
  model, loss_fn, views = train.default_model_and_loss(config)
  setup = train.set_up(config, model, loss_fn, views, batches[0])
  with jax.set_mesh(setup.mesh):
    state, sums = setup.init(), setup.zero_sums()
    batch = sharding.global_batch(batches[0], setup.batch_sharding)
    for _ in range(2):  # warm-up
      state, sums = setup.step(state, sums, batch)
    jax.block_until_ready(sums)
    start = time.perf_counter()
    for _ in range(repeats):
      state, sums = setup.step(state, sums, batch)
    jax.block_until_ready(sums)
    return (time.perf_counter() - start) / repeats


def loop_seconds_per_step(config, batches: list[dict], workdir: pathlib.Path) -> float:
  """Wall seconds per step of the real loop over the log intervals after the first."""
  dataset = grain.MapDataset.source(batches).repeat(None)
  train.train(config, workdir, train_dataset=dataset)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  rows = [r for r in rows if r["kind"] == "train"][1:]
  return sum(r["step_seconds"] for r in rows) / len(rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--log_every", type=int, default=20)
  parser.add_argument("--alone_repeats", type=int, default=10)
  parser.add_argument("--cache_dir", default=None,
                      help="persistent compilation cache (default: in the run's temp dir)")
  args = parser.parse_args(argv)
  if args.steps < 2 * args.log_every:
    parser.error("--steps must cover at least two log intervals")
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_loop_"))
  # Four set-ups compile the same step program: compile it once.
  jax.config.update("jax_compilation_cache_dir", args.cache_dir or str(root / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  base = bench_config(args.steps, args.log_every, sync_loop=False)
  batches = host_batches(base)
  # Alone, loop, alone, loop, alone: each loop is compared with the mean of the two
  # alone timings around it (the machine is shared; its speed drifts).
  alone = [step_alone_seconds(base, batches, args.alone_repeats)]
  loops = {}
  for name, sync in (("synchronous (train.sync_loop=True)", True),
                     ("asynchronous (default)", False)):
    per_step = loop_seconds_per_step(bench_config(args.steps, args.log_every, sync),
                                     batches, root / ("sync" if sync else "async"))
    alone.append(step_alone_seconds(base, batches, args.alone_repeats))
    loops[name] = ((alone[-2] + alone[-1]) / 2, per_step)
  timed = args.steps - args.log_every
  print(f"\nStep loop, preset 'demo' (global batch {base.train.batch_size}), "
        f"{len(jax.devices())} {jax.devices()[0].device_kind} device(s), log_every "
        f"{args.log_every}, {timed} timed loop steps per loop; compiled step alone "
        f"({args.alone_repeats} calls): {', '.join(f'{a * 1e3:.0f}' for a in alone)} ms")
  print("| loop | step alone (ms) | loop step (ms) | overhead |")
  print("|---|---|---|---|")
  for name, (step_alone, per_step) in loops.items():
    print(f"| {name} | {step_alone * 1e3:.1f} | {per_step * 1e3:.1f} | "
          f"{100 * (1 - step_alone / per_step):.1f}% |")

if __name__ == "__main__":
  main()
