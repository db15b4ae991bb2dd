"""Grain input throughput for a preset (decode + augment + tokenise + batch), in examples/s.

    python benchmarks/bench_pipeline.py                       # demo preset, workers 0 and 2
    python benchmarks/bench_pipeline.py --workers=0,1,2 --batches=40
    python benchmarks/bench_pipeline.py --trainer_steps=0     # pipeline only
    python benchmarks/bench_pipeline.py --trainer_rate=850    # a known trainer rate instead

Data: the demo world's mined training pairs (`train_pairs.csv`) if present in
--world_dir, else its eval pairs; the world is generated there first if missing. One
example is one (trigger, recall) pair, i.e. two images and two titles.

The trainer's consumption rate is measured in the same run (`measure_trainer`): the
real trainer (`train.train`, the preset's model, loss, mesh and optimizer) on one real
batch from the pipeline, repeated, so only the step is timed, not the input. It is
printed beside the pipeline's rate: the pipeline must outpace it. `--trainer_rate`
skips the measurement and uses the given examples/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from esspr_jax import config as config_lib  # noqa: E402
from esspr_jax.input import esspr_tfds, pipeline, tokenizer_stage  # noqa: E402
from esspr_jax.models.tokenizer import Tokenizer  # noqa: E402


def _pairs_dataset(config, world_dir: pathlib.Path, data_dir: pathlib.Path):
  from esspr_jax.demo_world import synthetic  # noqa: PLC0415
  paths = synthetic.WorldPaths.under(world_dir)
  if not paths.manifest.is_file():
    print(f"generating the {config.preset} demo world in {world_dir} ...", flush=True)
    synthetic.generate_world(config.data.world, world_dir)
  csv_path = paths.train_pairs if paths.train_pairs.is_file() else paths.eval_pairs
  return esspr_tfds.build_from_config(config, csv_path, world_dir, "bench_pairs",
                                      data_dir=data_dir)


def measure(source, tokenizer, spec: pipeline.PipelineSpec, batch_size: int, batches: int,
            warmup: int = 3) -> tuple[float, float | None]:
  """(examples per wall second, examples per CPU second of this process) of the train
  loader after `warmup` batches (worker start-up excluded). The CPU figure is only
  meaningful in-process (workers' CPU is not counted) and does not depend on what
  else the machine is running."""
  it = iter(pipeline.make_train_dataset(source, tokenizer, spec, batch_size,
                                        process_index=0, process_count=1))
  try:
    for _ in range(warmup):
      next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(it)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    examples = batches * batch_size
    return examples / wall, (examples / cpu if spec.worker_count == 0 else None)
  finally:
    it.close()


def measure_trainer(config, batch: dict, steps: int, workdir: pathlib.Path) -> float:
  """Examples/s the trainer consumes with `config` (one process, all local devices):
  `steps` timed steps after `steps` untimed ones (compilation and warm-up excluded),
  always on `batch`, so the input pipeline costs nothing here."""
  import grain  # noqa: PLC0415
  from esspr_jax import train  # noqa: PLC0415
  config = config.copy_and_resolve_references()
  config.train.steps = 2 * steps
  config.train.log_every = steps  # the last logged interval: the timed steps only
  config.train.schedule.warmup_steps = min(config.train.schedule.warmup_steps, steps)
  config.train.checkpoint.every = 10 * steps
  config.train.eval_at_end = False
  config.eval.every_steps = 0
  dataset = grain.MapDataset.source([batch]).repeat(None)
  result = train.train(config, workdir, train_dataset=dataset)
  return float(result.last_metrics["examples_per_sec"])


def run(preset: str = "demo", workers=(0, 2), batches: int = 30, world_dir=None,
        trainer_rate: float | None = None, trainer_steps: int = 5) -> list[dict]:
  """Measures each worker count (and, unless `trainer_rate` is given and when
  `trainer_steps` > 0, the trainer); returns and prints rows of the table."""
  config = config_lib.compose(preset)
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
  world_dir = pathlib.Path(world_dir) if world_dir else root / "world"
  ds = _pairs_dataset(config, world_dir, root / "tfds")
  source = ds.source()
  tokenizer = Tokenizer.train(tokenizer_stage.iter_titles(source),
                              config.model.tokenizer.vocab_size)
  batch_size = config.train.batch_size
  base = pipeline.spec_from_config(config)
  rows = []
  for count in workers:
    spec = dataclasses.replace(base, worker_count=count)
    rate, per_cpu_s = measure(source, tokenizer, spec, batch_size, batches)
    rows.append({"workers": count, "examples_per_s": rate, "examples_per_cpu_s": per_cpu_s})
  trainer_note = "given"
  if trainer_rate is None and trainer_steps > 0:
    print(f"measuring the {preset} trainer ({trainer_steps} timed steps) ...", flush=True)
    batch = next(iter(pipeline.make_train_dataset(source, tokenizer,
                                                  dataclasses.replace(base, worker_count=0),
                                                  batch_size, process_index=0,
                                                  process_count=1)))
    trainer_rate = measure_trainer(config, batch, trainer_steps, root / "trainer")
    trainer_note = f"measured, {trainer_steps} steps"
  print(f"\nGrain input pipeline, preset '{preset}': {ds.num_examples} pairs, batch {batch_size}, "
        f"image {base.image_size}px, max_len {base.max_len}, augment "
        f"{'on' if base.augment else 'off'}, read_threads {base.read_threads}")
  header = "| workers | pipeline examples/s | examples per CPU-s |" + (
      f" trainer examples/s ({trainer_note}) | headroom |" if trainer_rate else "")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  for row in rows:
    per_cpu = row["examples_per_cpu_s"]
    line = (f"| {row['workers']} | {row['examples_per_s']:.0f} | "
            f"{f'{per_cpu:.0f}' if per_cpu else '-'} |")
    if trainer_rate:
      line += f" {trainer_rate:.0f} | {row['examples_per_s'] / trainer_rate:.2f}x |"
    print(line)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="demo", choices=config_lib.PRESETS)
  parser.add_argument("--workers", default="0,2", help="comma list of worker_count values")
  parser.add_argument("--batches", type=int, default=30, help="timed batches per setting")
  parser.add_argument("--world_dir", default=None, help="existing/target demo world dir")
  parser.add_argument("--trainer_rate", type=float, default=None,
                      help="a known trainer rate in examples/s (skips measuring it)")
  parser.add_argument("--trainer_steps", type=int, default=5,
                      help="timed trainer steps for measuring its rate (0: do not measure)")
  args = parser.parse_args()
  run(args.preset, tuple(int(w) for w in args.workers.split(",")), args.batches,
      args.world_dir, args.trainer_rate, args.trainer_steps)


if __name__ == "__main__":
  main()
