"""The main job's stages: world -> mine -> build -> tokenizer -> train -> eval -> export
-> search. Each stage takes the previous stage's artifacts (paths) and returns its own;
where the run writes (workdir, world, data dir, hence the tokenizer cache) is decided
once, in `Paths.of`. esspr_jax/cli.py reads flags and picks the stages to run.

Every console line a stage prints goes through `say` (tests/test_console.py holds the
job to a fixed set of line formats); library logs go to <workdir>/logs/
(esspr_jax/console.py).
"""
from __future__ import annotations

import logging
import pathlib
import time

import jax

from esspr_jax import atomic_io
from esspr_jax import compile_check as compile_lib
from esspr_jax import console
from esspr_jax import distributed
from esspr_jax import sharding
from esspr_jax import train as train_lib
from esspr_jax import workdir as workdir_lib
from esspr_jax.paths import Paths
from esspr_jax.config.loss import composed_enabled
from esspr_jax.demo_world import synthetic
from esspr_jax.demo_world.pair_precision import pair_precision
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.hard_negatives import miner
from esspr_jax.input import esspr_tfds
from esspr_jax.input import pipeline
from esspr_jax.models import build_model
from esspr_jax.retrieval import duplicates_stage
from esspr_jax.retrieval import evaluate as evaluate_lib
from esspr_jax.retrieval import export as export_lib
from esspr_jax.retrieval import search as search_lib

log = logging.getLogger(__name__)

# Platforms a config can require (train.platform); 'any' requires none.
_ACCELERATORS = ("gpu", "tpu")
# No CPU device reaches this dense peak: a train.peak_flops at or above it was set for
# an accelerator (the smallest entry of metrics_writer.PEAK_FLOPS_BY_DEVICE_KIND is 197e12).
ACCELERATOR_PEAK_FLOPS = 50e12


def say(message: str) -> None:
  """A console line of the job's own (process 0 only)."""
  if distributed.is_primary():
    print(message, flush=True)


# ----------------------------------------------------------------------------- platform
def required_platform(config) -> str | None:
  """'gpu', 'tpu' or 'accelerator' when the config is laid out for one, else None."""
  platform = config.train.get("platform", "any")
  if platform in _ACCELERATORS:
    return platform
  if config.train.peak_flops >= ACCELERATOR_PEAK_FLOPS:
    return "accelerator"
  return None


def check_platform(config, *, allow_cpu: bool) -> str:
  """Says which backend and devices JAX found; refuses a CPU-only JAX for a config laid
  out for TPU/GPU (a pod run would otherwise train on the host CPU) unless allow_cpu."""
  backend = jax.default_backend()
  kind = jax.devices()[0].device_kind
  say(f"[jax] backend {backend}: {jax.device_count()} x {kind} "
      f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")
  wanted = required_platform(config)
  if wanted and backend == "cpu" and not allow_cpu:
    why = (f"train.platform={wanted!r}" if wanted in _ACCELERATORS else
           f"train.peak_flops={config.train.peak_flops:g} (an accelerator's)")
    extra = {"tpu": "esspr-jax[tpu]", "gpu": "esspr-jax[cuda12]"}.get(
        wanted, "esspr-jax[tpu] or esspr-jax[cuda12]")
    key = "train.platform" if wanted in _ACCELERATORS else "train.peak_flops"
    raise ConfigError(key, f"{why} but JAX sees only CPU devices; install {extra} "
                           "(launch/ does), or pass --allow_cpu to run on the CPU anyway")
  return backend


# ----------------------------------------------------------------------------- stages
def make_world(config, paths: Paths):
  """The demo world, generated once: a complete world has its manifest."""
  world = synthetic.WorldPaths.under(paths.world)
  if world.manifest.is_file():
    say(f"[world] reusing {paths.world}")
    return world
  start = time.time()
  world = synthetic.generate_world(config.data.world, paths.world)
  say(f"[world] generated {paths.world} in {time.time() - start:.1f}s")
  return world


def mine(config, clicklog, catalog, out, *, beam_args=None, precision: bool = False):
  """Mined pairs CSV `out` (and its report next to it); returns the mining report.
  The one mining entry point: `--mode=mine` and `python -m esspr_jax.ingest.mining`."""
  from esspr_jax.ingest import mining  # noqa: PLC0415  (Apache Beam: only this stage)
  start = time.time()
  report = mining.mine_pairs(clicklog, catalog, out, config.data.mining, beam_args or (),
                             verbose=False)
  if "://" not in str(out):
    atomic_io.write_json(mining_report_path(out), report.to_dict())
  say(f"[mine] {report.pairs_written} pairs -> {out} in {time.time() - start:.1f}s")
  if precision:
    say(pair_precision(out, catalog).table())
  return report


def mining_report_path(out) -> str:
  out = str(out)
  return (out[:-4] if out.endswith(".csv") else out) + ".report.json"


def build(config, paths: Paths, train_pairs, eval_pairs, image_dir) -> list[str]:
  """--mode=build: the datasets (build_datasets), holding the workdir's run lock, so a
  build never replaces the data of a run training there."""
  with workdir_lib.holding_run(paths.workdir, distributed.is_primary()):
    return build_datasets(config, paths, train_pairs, eval_pairs, image_dir)


def build_datasets(config, paths: Paths, train_pairs, eval_pairs, image_dir) -> list[str]:
  """Both datasets (each reused when its CSV and settings are unchanged), plus the
  composed-query triplets when that loss term is on; returns the dataset names."""
  p = config.data.pipeline
  datasets = [(p.train_dataset, train_pairs), (p.eval_dataset, eval_pairs)]
  if composed_enabled(config):  # the demo world's modification triplets
    composed_csv = pathlib.Path(image_dir) / "composed_pairs.csv"
    if not composed_csv.is_file():
      raise DataError(f"loss.composed.weight > 0 but {composed_csv} is missing; set "
                      f"data.world.composed_per_style > 0 or loss.composed.weight=0")
    datasets.append((p.composed_dataset, composed_csv))
  for name, csv in datasets:
    start = time.time()
    with console.library_prints("tensorflow_datasets"):
      esspr_tfds.build_from_config(config, csv, image_dir, name, data_dir=paths.data_dir)
    say(f"[build] {name} from {csv} in {time.time() - start:.1f}s")
  return [name for name, _ in datasets]


def tokenizer(config, paths: Paths):
  """The run's tokenizer (trained once on the train titles, cached in the data dir)."""
  start = time.time()
  tok = pipeline.run_tokenizer(config, paths.data_dir)
  say(f"[tokenizer] {config.model.tokenizer.kind} in {time.time() - start:.1f}s")
  return tok


def shared_tokenizer(config, paths: Paths):
  """The run's tokenizer on every process. A trained one is cached in the data dir:
  process 0 trains/writes it first, the others load it after a barrier (or, where each
  host prepared its own copy of the data, run the same deterministic stage locally)."""
  if distributed.is_primary():
    tok = pipeline.run_tokenizer(config, paths.data_dir)
  distributed.barrier("esspr_jax.stages: tokenizer cached")
  if not distributed.is_primary():
    stage = pipeline.run_tokenizer if paths.data_per_host else pipeline.load_tokenizer
    tok = stage(config, paths.data_dir)
  return tok


def train(config, paths: Paths, tok=None):
  """Trains with the run's hooks (eval; the miner when on); returns the TrainResult."""
  tok = tok or shared_tokenizer(config, paths)
  model = build_model(config.model)
  # With hard negatives on the trainer builds the pipeline itself (the miner attaches to it).
  dataset = None if config.train.hard_negatives.enabled else pipeline.train_dataset(
      config, train_lib.per_process_batch_size(config), data_dir=paths.data_dir, tokenizer=tok)
  eval_batches = lambda: pipeline.eval_dataset(config, config.eval.batch_size,  # noqa: E731
                                               data_dir=paths.data_dir, tokenizer=tok)
  hooks = training_hooks(config, paths.workdir, model=model, eval_batches=eval_batches,
                         eval_sharding=eval_batch_sharding(config))
  return train_lib.train(config, paths.workdir, model=model, train_dataset=dataset, hooks=hooks)


def training_hooks(config, workdir, *, train_source=None, model=None, eval_batches=None,
                   eval_sharding=None) -> list:
  """The train loop's hooks (esspr_jax/hooks.py) the run asks for: the hard-negative
  miner when train.hard_negatives.enabled (over `train_source`, else the run's training
  data); with `eval_batches` (a function returning fresh eval batches), `model`'s eval
  every eval.every_steps steps and at the end. Pass them as train(hooks=...)."""
  workdir, hooks = workdir_lib.workdir_path(workdir), []
  if config.train.hard_negatives.enabled:
    hooks.append(miner.from_config(config, workdir, workdir_lib.default_data_dir(config, workdir),
                                   train_lib.per_process_batch_size(config), source=train_source))
  if eval_batches is not None:
    hooks.append(evaluate_lib.eval_hook(config, workdir, model, eval_batches,
                                        batch_sharding=eval_sharding))
  return hooks


def eval_batch_sharding(config):
  """The trainer's batch sharding (same mesh, same rules) for the eval hook, so eval
  embeds each batch split over all devices. None (eval unsharded, with a warning) when
  the eval batch cannot be split evenly over the batch shards."""
  mesh = sharding.make_mesh(config.train)
  logical_rules = sharding.rules(config.train)
  shards = sharding.batch_shards(mesh, logical_rules)
  global_rows = config.eval.batch_size * jax.process_count()
  if global_rows % shards:
    log.warning("eval.batch_size %d x %d processes does not split over the %d batch shards; "
                "eval embeds without sharding the batch", config.eval.batch_size,
                jax.process_count(), shards)
    return None
  return sharding.batch_sharding(mesh, logical_rules)


def evaluate(config, paths: Paths, *, checkpoint=None, step=None):
  """--mode=eval, holding the workdir's run lock (it writes eval reports there)."""
  with workdir_lib.holding_run(paths.workdir, distributed.is_primary()):
    return evaluate_lib.evaluate_checkpoint(config, paths.workdir, checkpoint=checkpoint,
                                            step=step, data_dir=paths.data_dir)


def export(config, paths: Paths, catalog, image_dir, export_dir, *, checkpoint=None,
           step=None, update: bool = False):
  """Embeddings of `catalog` in `export_dir`; with `update`, only new or changed
  listings are embedded into the existing export (docs/retrieval.md). Holds the
  workdir's run lock."""
  with workdir_lib.holding_run(paths.workdir, distributed.is_primary()):
    return export_lib.export_catalog(config, paths.workdir, catalog, image_dir, export_dir,
                                     checkpoint=checkpoint, step=step, data_dir=paths.data_dir,
                                     update=update)


def search(config, paths: Paths, export_dir, **query):
  return search_lib.search_from_config(config, paths.workdir, export_dir, **query)


def duplicates(config, paths: Paths, catalog=None, image_dir=None, *, pairs=None,
               checkpoint=None, step=None):
  """--mode=duplicates (retrieval/duplicates_stage.py); the catalog defaults to the world's.
  Holds the workdir's run lock (it writes <workdir>/duplicates)."""
  catalog = catalog or paths.world / "catalog.csv"
  with workdir_lib.holding_run(paths.workdir, distributed.is_primary()):
    report = duplicates_stage.run_duplicates(
        config, paths.workdir, catalog, image_dir or pathlib.Path(catalog).parent,
        f"{paths.workdir}/duplicates", pairs=pairs, checkpoint=checkpoint, step=step,
        data_dir=paths.data_dir)
  for line in duplicates_stage.summary_lines(report):
    say(line)
  return report


# ----------------------------------------------------------------------------- the job
def compile_check(config, paths: Paths, topology_name: str):
  """--mode=compile: the train and embedding steps compiled for a topology; prints the
  report and writes it under <workdir>/compile/ (compile_check.py)."""
  report = compile_lib.run(config, paths.workdir, topology_name)
  say(report.table())
  say(f"[compile] report: {compile_lib.report_path(paths.workdir, topology_name)}")
  return report


def prepare_data(config, paths: Paths) -> None:
  """Demo world -> mined pairs -> both datasets -> tokenizer cache (each reused when
  present). Writes shared files, so only one process may run it (see run_all)."""
  world = make_world(config, paths)
  if not world.train_pairs.is_file():
    mine(config, world.clicklog, world.catalog, world.train_pairs)
  else:
    say(f"[mine] reusing {world.train_pairs}")
  # run_all holds the workdir's lock already (on process 0 only, which runs this alone)
  build_datasets(config, paths, world.train_pairs, world.eval_pairs, world.out_dir)
  tokenizer(config, paths)


def prepare_data_on_every_host(config, paths: Paths) -> None:
  """A remote workdir: the data is local, so every process prepares it (seeded, so
  every host gets the same files); processes sharing a host take turns (a lock in the
  data dir; later ones reuse what the first wrote). Then all processes check that they
  hold the same pairs, since each trains on its shard of one global order."""
  with workdir_lib.host_lock(paths.data_dir):
    prepare_data(config, paths)
  workdir_lib.check_same_everywhere(
      workdir_lib.files_digest(sorted(paths.world.glob("*.csv"))),
      f"the demo data prepared under {paths.world}")


def run_all(config, paths: Paths):
  """The main job: from nothing to a results table. Process 0 prepares the data while
  the others wait at a barrier, then every process opens it and trains."""
  start = time.time()
  # The whole job holds the workdir (train() takes the same lock again: it nests), so a
  # second job on it stops before it prepares anything.
  lock = workdir_lib.lock_run(paths.workdir, distributed.is_primary())
  try:
    if paths.data_per_host:
      prepare_data_on_every_host(config, paths)
    elif distributed.is_primary():
      prepare_data(config, paths)
    distributed.barrier("esspr_jax.stages: data prepared")
    result = train(config, paths, shared_tokenizer(config, paths))
  finally:
    if lock:
      lock.release()
  say(summary(paths, result, time.time() - start))
  return result


def train_only(config, paths: Paths):
  """--mode=train: the already built datasets; the summary gives its real duration."""
  start = time.time()
  result = train(config, paths)
  say(summary(paths, result, time.time() - start))
  return result


def summary(paths: Paths, result, seconds: float) -> str:
  if result.stopped == "preempted":
    head = (f"\nstopped by a preemption signal at step {result.step} (saved); run the same "
            f"command again to resume.")
  else:
    head = f"\ndone in {_duration(seconds)} ({result.step} steps)."
  lines = [head,
           f"  demo world     {paths.world}",
           f"  datasets       {paths.data_dir}",
           f"  checkpoints    {result.checkpoint_dir}",
           f"  metrics        {result.metrics_path} (TensorBoard: {paths.workdir / 'tensorboard'})",
           f"  config         {paths.workdir / 'config.json'}"]
  if paths.logs is not None:
    lines.append(f"  logs           {paths.logs}")
  eval_dir = paths.workdir / "eval"
  if eval_dir.is_dir():
    lines.append(f"  eval reports   {eval_dir}")
  return "\n".join(lines)


def _duration(seconds: float) -> str:
  """'42.3s' under two minutes, else '5.8 min': a short run never reads '0.0 min'."""
  return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"
