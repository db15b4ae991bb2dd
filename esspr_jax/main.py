"""Command-line entry: one config, one workdir, a mode.

    python -m esspr_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m esspr_jax.main --config=configs/demo.py --workdir=runs/demo --config.train.steps=200

Modes:
  all (default)  the main job: demo world (if absent) -> mine pairs -> build datasets ->
                 tokenizer -> train -> evaluation table; prints where everything went.
  demo-world     only generate the demo world (into --world_dir).
  mine           mine pairs from --clicklog/--catalog into --out (Apache Beam).
  build          build the train/eval TFDS datasets from --train_pairs/--eval_pairs.
  train          train on the already built datasets (resumes from the workdir).
  eval           evaluate a checkpoint (latest, or --step) on the eval dataset.
  export         embed the catalog --catalog (images under --image_dir) into --export_dir.
  search         query an export: --listing_id, or --image and/or --text, or --supplier.

The whole config is validated before anything runs; a misspelt override
(`--config.train.stpes=3`) is an error, since the config is locked.
"""
import dataclasses
import logging
import pathlib
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from esspr_jax import distributed
from esspr_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODES = ("all", "demo-world", "mine", "build", "train", "eval", "export", "search")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Loggers that write a line per file or per array at INFO (Orbax: hundreds per save).
QUIET_LOGGERS = ("absl", "orbax", "grain", "tensorflow_datasets", "jax", "apache_beam")


def define_flags(fv: flags.FlagValues, sys_argv: list[str] | None = None) -> None:
  """All of main's flags on `fv`. `--config.KEY=VALUE` overrides are discovered in
  `sys_argv` (default: sys.argv); tests pass their own FlagValues and argv."""
  config_flags.DEFINE_config_file("config", None, "run config file, e.g. configs/demo.py",
                                  flag_values=fv, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, reports",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "all", MODES, "what to run (see the module doc)", flag_values=fv)
  flags.DEFINE_string("world_dir", None, "demo world dir (default: <workdir>/world)",
                      flag_values=fv)
  # mine / build
  flags.DEFINE_multi_string("clicklog", None, "click-log file(s) for --mode=mine",
                            flag_values=fv)
  flags.DEFINE_string("catalog", None, "catalog CSV (mine, export)", flag_values=fv)
  flags.DEFINE_string("out", None, "output pairs CSV for --mode=mine", flag_values=fv)
  flags.DEFINE_string("train_pairs", None, "train pairs CSV for --mode=build", flag_values=fv)
  flags.DEFINE_string("eval_pairs", None, "eval pairs CSV for --mode=build", flag_values=fv)
  flags.DEFINE_string("image_dir", None, "dir the CSVs' image paths resolve against",
                      flag_values=fv)
  # eval / export / search
  flags.DEFINE_string("checkpoint", None, "run or checkpoints dir (default: --workdir)",
                      flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
  flags.DEFINE_string("export_dir", None, "export dir (default: <workdir>/export)",
                      flag_values=fv)
  flags.DEFINE_bool("update", False, "export: embed only new/changed listings into the "
                    "existing export (docs/retrieval.md)", flag_values=fv)
  flags.DEFINE_string("listing_id", "", "search: listings of the same style as this one",
                      flag_values=fv)
  flags.DEFINE_string("image", "", "search: query image file", flag_values=fv)
  flags.DEFINE_string("text", "", "search: query text (with --image: modifies it)",
                      flag_values=fv)
  flags.DEFINE_string("supplier", "", "search: supplier (alone: its likely duplicates)",
                      flag_values=fv)
  flags.DEFINE_bool("more_suppliers", False, "search: other suppliers only", flag_values=fv)
  flags.DEFINE_string("category", "", "search: restrict to this leaf category",
                      flag_values=fv)
  flags.DEFINE_string("gallery", "m", "search: gallery modality i, t or m", flag_values=fv)
  flags.DEFINE_integer("k", 0, "search: results (0: config.eval.search.k)", flag_values=fv)
  flags.DEFINE_string("html_out", "", "search: also write an HTML page here", flag_values=fv)
  flags.DEFINE_enum("log_level", "warning", LOG_LEVELS,
                    "console log level of the libraries (Orbax, Grain, TFDS, JAX) and of "
                    "esspr_jax's own log records; progress and stage lines always print",
                    flag_values=fv)
  distributed.define_flags(fv)


@dataclasses.dataclass
class Paths:
  """Where a run writes; printed at the end of the main job. The workdir may be a
  gs:// URL (an epath); the world and the datasets are local (esspr_jax/workdir.py)."""
  workdir: "epath.Path"
  world: pathlib.Path
  data_dir: pathlib.Path

  @property
  def data_per_host(self) -> bool:
    """Each host prepares its own local copy of the data: the workdir is remote."""
    from esspr_jax import workdir as workdir_lib  # noqa: PLC0415
    return workdir_lib.is_remote(self.workdir) and not workdir_lib.is_remote(self.data_dir)

  @classmethod
  def of(cls, config, fv) -> "Paths":
    from esspr_jax import train  # noqa: PLC0415
    from esspr_jax import workdir as workdir_lib  # noqa: PLC0415
    workdir = workdir_lib.workdir_path(fv.workdir)
    if fv.world_dir:
      world = workdir_lib.local_path(fv.world_dir, "--world_dir")
    elif workdir_lib.is_remote(workdir):
      world = workdir_lib.local_data_root(config) / "world"
    else:
      world = pathlib.Path(workdir) / "world"
    return cls(workdir, world, train.data_dir(config, workdir).absolute())


def _say(message: str) -> None:
  if distributed.is_primary():
    print(message, flush=True)


_SHOW_LIBRARY_PROGRESS = True  # TFDS's progress bars; off below --log_level=info


def configure_logging(level: str) -> None:
  """Console log level for absl (what Orbax, Grain and TFDS log through) and the
  libraries' Python loggers. Default 'warning': a checkpoint then prints nothing, and
  the progress line and results stay readable; 'info' brings the details back."""
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(level)
  numeric = getattr(logging, level.upper())
  logging.getLogger().setLevel(numeric)
  for name in QUIET_LOGGERS + ("esspr_jax",):
    logging.getLogger(name).setLevel(numeric)
  global _SHOW_LIBRARY_PROGRESS
  _SHOW_LIBRARY_PROGRESS = numeric <= logging.INFO


# ----------------------------------------------------------------------------- stages
def make_world(config, paths: Paths):
  """The demo world, generated once: a complete world has its manifest."""
  from esspr_jax.demo_world import synthetic  # noqa: PLC0415
  world = synthetic.WorldPaths.under(paths.world)
  if world.manifest.is_file():
    _say(f"[world] reusing {paths.world}")
    return world
  start = time.time()
  world = synthetic.generate_world(config.data.world, paths.world)
  _say(f"[world] generated {paths.world} in {time.time() - start:.1f}s")
  return world


def mine(config, clicklog, catalog, out) -> None:
  from esspr_jax.ingest import mining  # noqa: PLC0415
  start = time.time()
  report = mining.mine_pairs(clicklog, catalog, out, config.data.mining, verbose=False)
  _say(f"[mine] {report.pairs_written} pairs -> {out} in {time.time() - start:.1f}s")


def build(config, paths: Paths, train_pairs, eval_pairs, image_dir) -> None:
  """Both datasets (each reused when its CSV and settings are unchanged)."""
  from esspr_jax.input import esspr_tfds  # noqa: PLC0415
  if not _SHOW_LIBRARY_PROGRESS:
    import tensorflow_datasets as tfds  # noqa: PLC0415
    tfds.disable_progress_bar()
  from esspr_jax.config.loss import composed_enabled  # noqa: PLC0415
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
    esspr_tfds.build_from_config(config, csv, image_dir, name, data_dir=paths.data_dir)
    _say(f"[build] {name} from {csv} in {time.time() - start:.1f}s")


def tokenizer(config, paths: Paths):
  from esspr_jax.input import pipeline  # noqa: PLC0415
  start = time.time()
  tok = pipeline.tokenizer_from_config(config, paths.data_dir)
  _say(f"[tokenizer] {config.model.tokenizer.kind} in {time.time() - start:.1f}s")
  return tok


def train(config, paths: Paths, tok=None):
  """Trains with the evaluation hook; returns the TrainResult."""
  from esspr_jax import train as train_lib  # noqa: PLC0415
  from esspr_jax.input import pipeline  # noqa: PLC0415
  from esspr_jax.models import build_model  # noqa: PLC0415
  from esspr_jax.retrieval import evaluate  # noqa: PLC0415
  tok = tok or shared_tokenizer(config, paths)
  model = build_model(config.model)
  dataset = pipeline.train_dataset(config, train_lib.per_process_batch_size(config),
                                   data_dir=paths.data_dir, tokenizer=tok)
  eval_batches = lambda: pipeline.eval_dataset(config, config.eval.batch_size,  # noqa: E731
                                               data_dir=paths.data_dir, tokenizer=tok)
  eval_fn = evaluate.make_eval_hook(config, paths.workdir, model, eval_batches,
                                    batch_sharding=eval_batch_sharding(config))
  return train_lib.train(config, paths.workdir, model=model, train_dataset=dataset,
                         eval_fn=eval_fn)


def eval_batch_sharding(config):
  """The trainer's batch sharding (same mesh, same rules) for the eval hook, so eval
  embeds each batch split over all devices. None (eval unsharded, with a warning) when
  the eval batch cannot be split evenly over the batch shards."""
  from esspr_jax import sharding  # noqa: PLC0415
  import jax  # noqa: PLC0415
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


def prepare_data(config, paths: Paths) -> None:
  """Demo world -> mined pairs -> both datasets -> tokenizer cache (each reused when
  present). Writes shared files, so only one process may run it (see run_all)."""
  world = make_world(config, paths)
  if not world.train_pairs.is_file():
    mine(config, world.clicklog, world.catalog, world.train_pairs)
  else:
    _say(f"[mine] reusing {world.train_pairs}")
  build(config, paths, world.train_pairs, world.eval_pairs, world.out_dir)
  tokenizer(config, paths)


def shared_tokenizer(config, paths: Paths):
  """The run's tokenizer on every process. A trained one is cached in the data dir:
  process 0 trains/writes it first, the others load it after a barrier."""
  from esspr_jax.input import pipeline  # noqa: PLC0415
  if distributed.is_primary():
    tok = pipeline.tokenizer_from_config(config, paths.data_dir)
  distributed.barrier("esspr_jax.main: tokenizer cached")
  if not distributed.is_primary():
    tok = pipeline.tokenizer_from_config(config, paths.data_dir)
  return tok


def prepare_data_on_every_host(config, paths: Paths) -> None:
  """A remote workdir: the data is local, so every process prepares it (seeded, so
  every host gets the same files); processes sharing a host take turns (a lock in the
  data dir; later ones reuse what the first wrote). Then all processes check that they
  hold the same pairs, since each trains on its shard of one global order."""
  from esspr_jax import workdir as workdir_lib  # noqa: PLC0415
  with workdir_lib.host_lock(paths.data_dir):
    prepare_data(config, paths)
  workdir_lib.check_same_everywhere(
      workdir_lib.files_digest(sorted(paths.world.glob("*.csv"))),
      f"the demo data prepared under {paths.world}")


def run_all(config, paths: Paths):
  """The main job: from nothing to a results table. Process 0 prepares the data while
  the others wait at a barrier, then every process opens it and trains."""
  start = time.time()
  if paths.data_per_host:
    prepare_data_on_every_host(config, paths)
  elif distributed.is_primary():
    prepare_data(config, paths)
  distributed.barrier("esspr_jax.main: data prepared")
  result = train(config, paths, shared_tokenizer(config, paths))
  _say(summary(paths, result, time.time() - start))
  return result


def summary(paths: Paths, result, seconds: float) -> str:
  if result.stopped == "preempted":
    head = (f"\nstopped by a preemption signal at step {result.step} (saved); run the same "
            f"command again to resume.")
  else:
    head = f"\ndone in {seconds / 60:.1f} min ({result.step} steps)."
  lines = [head,
           f"  demo world     {paths.world}",
           f"  datasets       {paths.data_dir}",
           f"  checkpoints    {result.checkpoint_dir}",
           f"  metrics        {result.metrics_path} (TensorBoard: {paths.workdir / 'tensorboard'})",
           f"  config         {paths.workdir / 'config.json'}"]
  eval_dir = paths.workdir / "eval"
  if eval_dir.is_dir():
    lines.append(f"  eval reports   {eval_dir}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- dispatch
def _require(fv, *names) -> None:
  missing = [n for n in names if not fv[n].value]
  if missing:
    raise ConfigError("flags", f"--mode={fv.mode} needs {', '.join('--' + n for n in missing)}")


def _local_export_dir(fv, paths: Paths) -> pathlib.Path:
  """--export_dir, else <workdir>/export. Local either way: the shards and the ScaNN
  index are memory-mapped local files (with a gs:// workdir, pass --export_dir)."""
  from esspr_jax import workdir as workdir_lib  # noqa: PLC0415
  return workdir_lib.local_path(fv.export_dir or paths.workdir / "export", "--export_dir")


def run(config, fv):
  """Runs `fv.mode` for a parsed, validated config."""
  paths = Paths.of(config, fv)
  mode = fv.mode
  if mode == "all":
    return run_all(config, paths)
  if mode == "demo-world":
    return make_world(config, paths)
  if mode == "mine":
    _require(fv, "clicklog", "catalog", "out")
    return mine(config, fv.clicklog, fv.catalog, fv.out)
  if mode == "build":
    _require(fv, "train_pairs", "eval_pairs", "image_dir")
    return build(config, paths, fv.train_pairs, fv.eval_pairs, fv.image_dir)
  if mode == "train":
    result = train(config, paths)
    _say(summary(paths, result, 0.0))
    return result
  if mode == "eval":
    from esspr_jax.retrieval import evaluate  # noqa: PLC0415
    return evaluate.evaluate_checkpoint(config, paths.workdir, checkpoint=fv.checkpoint,
                                        step=fv.step, data_dir=paths.data_dir)
  if mode == "export":
    _require(fv, "catalog", "image_dir")
    from esspr_jax.retrieval import export  # noqa: PLC0415
    out = _local_export_dir(fv, paths)
    return export.export_catalog(config, paths.workdir, fv.catalog, fv.image_dir, out,
                                 checkpoint=fv.checkpoint, step=fv.step,
                                 data_dir=paths.data_dir, update=fv.update)
  if mode == "search":
    from esspr_jax.retrieval import search  # noqa: PLC0415
    return search.search_from_config(
        config, paths.workdir, _local_export_dir(fv, paths),
        listing_id=fv.listing_id, image=fv.image, text=fv.text, supplier=fv.supplier,
        more_suppliers=fv.more_suppliers, category=fv.category, gallery=fv.gallery, k=fv.k,
        html_out=fv.html_out, image_dir=fv.image_dir or "", checkpoint=fv.checkpoint)
  raise ConfigError("flags", f"unknown --mode={mode}")


def parse_flags(argv: list[str], fv: flags.FlagValues | None = None) -> list[str]:
  """Parses argv into `fv` (default: the global FLAGS); a misspelt or mistyped
  `--config.KEY=VALUE` override becomes a ConfigError naming the override."""
  fv = flags.FLAGS if fv is None else fv
  try:
    return fv(argv)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    detail = " ".join(str(e).replace("\\'", "'").replace("\\n", " ").split()).strip("'\"")
    bad = detail.split("'")[0]  # KeyError messages start with the unknown field
    keys = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
    named = [k for k in keys if bad in k.split(".")]
    key = (named or keys or ["flags"])[0]
    detail = detail.replace(bad + "'", repr(bad), 1)
    raise ConfigError(key, f"bad command-line override: {detail}") from e


def config_from_flags(fv):
  """The run config after overrides, validated; ConfigError names a bad key."""
  from esspr_jax.config import validate_config  # noqa: PLC0415
  if fv.config is None:
    raise ConfigError("flags", "--config is required, e.g. --config=configs/demo.py")
  if not fv.workdir:
    raise ConfigError("flags", "--workdir is required, e.g. --workdir=runs/demo")
  validate_config(fv.config)
  return fv.config


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  try:
    configure_logging(fv.log_level)
    config = config_from_flags(fv)
    distributed.initialize_from_flags(fv)
    run(config, fv)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except Exception as e:  # noqa: BLE001  (one clean line for the known stop reasons)
    from esspr_jax.train import NonFiniteLossError  # noqa: PLC0415
    if isinstance(e, NonFiniteLossError):
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 3
    raise
  return 0


def _parse_or_exit(argv: list[str]) -> list[str]:
  try:
    return parse_flags(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}\nsee --helpfull", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(main, flags_parser=_parse_or_exit)
