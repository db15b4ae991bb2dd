"""esspr-jax: one config, one workdir, a mode.

    esspr-jax --config=configs/demo.py --workdir=runs/demo
    esspr-jax --config=configs/demo.py --workdir=runs/demo --config.train.steps=200

Modes (--mode): all (default: demo world -> mine -> build -> tokenizer -> train ->
eval table), demo-world, mine (--clicklog/--catalog/--out; Beam options after `--`),
fetch-images (--pairs with image URLs -> --out with local paths under --image_dir),
build, train, eval, export, search, duplicates (calibrated duplicate threshold + clusters;
--pairs: labelled pairs, default the demo world's truth), compile (--topology=v5e:4x8 or
cpu:N: compile the train and embedding steps for that slice with no data and no TPU,
report memory per chip, FLOPs and collectives; exit 2 when the step does not fit). `python -m esspr_jax.main` is the same command.
The config is validated before anything runs; library logs go to <workdir>/logs/
(--verbosity=1: also on the console). Exit codes: 0 done, 2 bad input or a disk
fault (one `error:` line), 3 non-finite loss, 130 Ctrl-C, 143 SIGTERM before training
(during training: the step is saved, exit 0; the same command resumes).
"""
from __future__ import annotations

import errno
import logging
import os
import pathlib
import signal
import sys
import threading
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from esspr_jax import console
from esspr_jax import distributed
from esspr_jax import topology
from esspr_jax.paths import Paths
from esspr_jax import workdir as workdir_lib
from esspr_jax.config import validate_config
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.ingest import fetch_images

log = logging.getLogger(__name__)

MODES = ("all", "demo-world", "mine", "fetch-images", "build", "train", "eval", "export",
         "search", "duplicates", "compile")
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")
# Modes that read or write the workdir (mine writes next to --out instead).
_WORKDIR_MODES = tuple(m for m in MODES if m not in ("mine", "fetch-images"))
# Write faults shown as one line instead of a traceback (or Orbax's pages of them).
_DISK_FAULTS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                errno.EFBIG)
_DISK_FAULT_TEXT = ("No space left on device", "Read-only file system", "Disk quota exceeded",
                    "File too large")


# A run a preemption notice (SIGTERM) stopped has saved its last step: a success for the
# scheduler that sent it, and the same command resumes it (recipes stop with it too).
EXIT_PREEMPTED = 0


def _stages():
  """The stages module, imported when a mode runs: --help and flag errors answer
  without loading JAX, Grain, TFDS, ScaNN and Beam (about 3 s of start-up here)."""
  from esspr_jax import stages  # noqa: PLC0415  (start-up time, see the docstring)
  return stages


class CommandLineError(ValueError):
  """A flag is missing, malformed or names a file that is not there."""


def define_flags(fv: flags.FlagValues, sys_argv: list[str] | None = None) -> None:
  """All flags on `fv`. `--config.KEY=VALUE` overrides are discovered in `sys_argv`
  (default: sys.argv); tests pass their own FlagValues and argv."""
  config_flags.DEFINE_config_file("config", None, "run config file, e.g. configs/demo.py",
                                  flag_values=fv, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, reports, logs",
                      flag_values=fv)
  flags.DEFINE_enum("mode", "all", MODES, "what to run (see the usage above)", flag_values=fv)
  flags.DEFINE_integer("verbosity", 0, "0: the job's own lines only; 1: also library logs "
                       "(absl, TFDS, Beam, Orbax, JAX) on the console; 2: and DEBUG",
                       flag_values=fv)
  flags.DEFINE_bool("allow_cpu", False, "run a config laid out for TPU/GPU (train.platform, "
                    "train.peak_flops) although JAX sees only CPU devices", flag_values=fv)
  flags.DEFINE_string("world_dir", None, "demo world dir (default: <workdir>/world)",
                      flag_values=fv)
  # mine / build
  flags.DEFINE_multi_string("clicklog", None, "mine: click-log file(s)", flag_values=fv)
  flags.DEFINE_string("catalog", None, "mine, export: catalog CSV", flag_values=fv)
  flags.DEFINE_string("out", None, "mine: output pairs CSV", flag_values=fv)
  flags.DEFINE_bool("precision", False, "mine: also print pair precision against the "
                    "catalog's hidden style_id (demo world only)", flag_values=fv)
  flags.DEFINE_integer("num_shards", None, "mine: output shards (0 = the runner decides; "
                       "default: config.data.mining.num_shards)", flag_values=fv)
  flags.DEFINE_string("pairs", None, "fetch-images: release-format pairs CSV with image URLs; "
                      "duplicates: labelled pairs (release format, label 1/0)",
                      flag_values=fv)
  flags.DEFINE_string("train_pairs", None, "build: train pairs CSV", flag_values=fv)
  flags.DEFINE_string("eval_pairs", None, "build: eval pairs CSV", flag_values=fv)
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
  # compile
  flags.DEFINE_string("topology", None, "compile: a TPU slice libtpu knows (v5e:4x8, "
                      "v4:2x2x2, v5p:2x2x4, v6e:4x4, ...) or cpu:N", flag_values=fv)
  distributed.define_flags(fv)


# ----------------------------------------------------------------------------- parsing
def _config_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(argv: list[str]) -> None:
  """A missing config file is one clear line (ml_collections would defer the error to
  the first access of the config, as an opaque traceback)."""
  value = _config_arg(argv)
  if value is None:
    return
  path = value.split(":", 1)[0]
  if not os.path.isfile(path):
    raise CommandLineError(f"--config={value}: no such file {path!r}")


def _errors_in_chain(error: BaseException):
  """`error`, then the errors it was raised from or while handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def config_file_error(value: str, error: BaseException) -> CommandLineError | None:
  """One line naming the file and line when `error` (or an error it wraps: absl and
  ml_collections wrap some) came from the config file `--config=value` itself: a syntax
  error, or an exception raised while it loads or in its get_config(); else None."""
  path = value.split(":", 1)[0]
  real = os.path.realpath(path)
  for e in _errors_in_chain(error):
    if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == real:
      return CommandLineError(f"config file {path}, line {e.lineno}: {type(e).__name__}: "
                              f"{e.msg}")
    lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
             if os.path.realpath(frame.filename) == real]
    if lines:
      text = (str(e).strip().splitlines() or [""])[0]
      return CommandLineError(f"config file {path}, line {lines[-1]}: {type(e).__name__}: "
                              f"{text}".rstrip(": "))
  return None


def parse_flags(argv: list[str], fv: flags.FlagValues | None = None) -> list[str]:
  """Parses argv into `fv` (default: the global FLAGS); a misspelt or mistyped
  `--config.KEY=VALUE` override becomes a ConfigError naming the override, and an error
  of the config file itself a CommandLineError naming the file and line."""
  fv = flags.FLAGS if fv is None else fv
  check_config_file(argv)
  try:
    return _parse_argv(argv, fv)
  except Exception as e:
    value = _config_arg(argv)
    fault = config_file_error(value, e) if value else None
    if fault is None:
      raise
    raise fault from None


def _parse_argv(argv: list[str], fv: flags.FlagValues) -> list[str]:
  try:
    return fv(argv)
  except flags.IllegalFlagValueError as e:
    if "get_config() takes 0 positional arguments" in str(e):
      value = _config_arg(argv)
      path, arg = value.split(":", 1)
      raise CommandLineError(f"--config={value}: {path} takes no argument (its get_config() "
                             f"has no parameter); drop ':{arg}'") from None
    raise
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
  if fv.config is None:
    if fv["config"].present:
      value = fv["config"].config_filename
      raise CommandLineError(f"config file {value.split(':')[0]}: get_config() returned "
                             f"None (is its return statement missing?)")
    raise ConfigError("flags", "--config is required, e.g. --config=configs/demo.py")
  try:
    fv.config.keys()
  except OSError as e:  # ml_collections defers an OSError of the config file to first use
    fault = config_file_error(fv["config"].config_filename, e)
    if fault is None:
      raise
    raise fault from None
  if not fv.workdir and fv.mode in _WORKDIR_MODES:
    raise ConfigError("flags", "--workdir is required, e.g. --workdir=runs/demo")
  validate_config(fv.config)
  return fv.config


# ----------------------------------------------------------------------------- dispatch
def _require(fv, *names) -> None:
  missing = [n for n in names if not fv[n].value]
  if missing:
    raise ConfigError("flags", f"--mode={fv.mode} needs {', '.join('--' + n for n in missing)}")


def _local_export_dir(fv, paths) -> pathlib.Path:
  """--export_dir, else <workdir>/export. Local either way: the shards and the ScaNN
  index are memory-mapped local files (with a gs:// workdir, pass --export_dir)."""
  return workdir_lib.local_path(fv.export_dir or paths.workdir / "export", "--export_dir")


def run(config, fv, beam_args=()):
  """Runs `fv.mode` for a parsed, validated config."""
  stages = _stages()
  mode = fv.mode
  if mode == "fetch-images":
    report = fetch_images.fetch_from_config(config, fv.pairs or fv.train_pairs, fv.out,
                                            fv.image_dir)
    stages.say(report.table())
    return report
  if mode == "mine":
    _require(fv, "clicklog", "catalog", "out")
    if fv.num_shards is not None:
      config.data.mining.num_shards = fv.num_shards
    report = stages.mine(config, fv.clicklog, fv.catalog, fv.out, beam_args=list(beam_args),
                         precision=fv.precision)
    stages.say(report.table())
    return report
  if beam_args:
    raise CommandLineError(f"unexpected arguments {list(beam_args)} (only --mode=mine passes "
                           "arguments after `--` on, to Beam)")
  paths = Paths.of(config, fv)
  if mode == "all":
    return stages.run_all(config, paths)
  if mode == "demo-world":
    return stages.make_world(config, paths)
  if mode == "build":
    _require(fv, "train_pairs", "eval_pairs", "image_dir")
    return stages.build(config, paths, fv.train_pairs, fv.eval_pairs, fv.image_dir)
  if mode == "train":
    return stages.train_only(config, paths)
  if mode == "eval":
    return stages.evaluate(config, paths, checkpoint=fv.checkpoint, step=fv.step)
  if mode == "export":
    _require(fv, "catalog", "image_dir")
    return stages.export(config, paths, fv.catalog, fv.image_dir, _local_export_dir(fv, paths),
                         checkpoint=fv.checkpoint, step=fv.step, update=fv.update)
  if mode == "search":
    return stages.search(
        config, paths, _local_export_dir(fv, paths),
        listing_id=fv.listing_id, image=fv.image, text=fv.text, supplier=fv.supplier,
        more_suppliers=fv.more_suppliers, category=fv.category, gallery=fv.gallery, k=fv.k,
        html_out=fv.html_out, image_dir=fv.image_dir or "", checkpoint=fv.checkpoint)
  if mode == "compile":
    _require(fv, "topology")
    return stages.compile_check(config, paths, fv.topology)
  if mode == "duplicates":
    return stages.duplicates(config, paths, fv.catalog, fv.image_dir, pairs=fv.pairs,
                             checkpoint=fv.checkpoint, step=fv.step)
  raise ConfigError("flags", f"unknown --mode={mode}")


def _log_dir(config, fv) -> pathlib.Path | None:
  if fv.mode in ("mine", "fetch-images") and not fv.workdir:
    out = fv.out or ""
    return pathlib.Path(out).absolute().parent / "logs" if out and "://" not in out else None
  return Paths.of(config, fv).logs


# ----------------------------------------------------------------------------- errors
def disk_fault(error: BaseException, workdir=None) -> str | None:
  """'cannot write PATH: REASON' when `error` (or an error it wraps) is a write fault:
  read-only or full filesystem, quota, permission; else None. PATH is the file the
  error names, else 'under WORKDIR'."""
  place = f"under {workdir}" if workdir else "to disk"
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FAULTS:
      where = error.filename or place
      return f"cannot write {where}: {error.strerror or os.strerror(error.errno)}"
    text = str(error)
    for phrase in _DISK_FAULT_TEXT:
      if phrase in text:
        return f"cannot write {place}: {phrase}"
    error = error.__cause__ or error.__context__
  return None


def _error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


_STOP_MESSAGES = {
    signal.SIGTERM: "stopped by SIGTERM during start-up, before training began",
    signal.SIGINT: "interrupted (Ctrl-C); a started training run resumes from its last "
                   "checkpoint",
}


def _on_stop_signal(signum, frame):
  """SIGTERM before training took it over (training saves, then stops), or Ctrl-C:
  one line and exit 128+signal at once. Exiting here, not raising into whatever runs
  (a process pool starting, Beam, a gc callback that swallows KeyboardInterrupt), is
  what never hangs or carries on; every file write is atomic."""
  del frame
  _error(_STOP_MESSAGES[signum])
  os._exit(128 + signum)  # noqa: SLF001


# Library noise no caller can catch, kept off the console: the log file has it during a
# command, nothing prints it after. A failed asynchronous checkpoint write leaves
# TensorStore calling into Orbax's closed event loop (sys.unraisablehook) and asyncio
# tasks whose errors nobody read, logged when they are collected after the command.
_UNRAISABLE = logging.getLogger("unraisable")
_QUIET_AFTER_A_COMMAND = ("asyncio", _UNRAISABLE.name)


def _log_unraisable(unraisable) -> None:
  """sys.unraisablehook during a command: into the log file, not onto the console."""
  _UNRAISABLE.warning("exception ignored in %r", unraisable.object, exc_info=(
      unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def usage(fv: flags.FlagValues, full: bool = False) -> str:
  """The module doc and this command's flags (absl's helpshort; --helpfull: all)."""
  flag_help = fv.get_help() if full else fv.module_help(__name__)
  return f"{__doc__.strip()}\n\n{flag_help}\n\nTry --helpfull for every flag."


def execute(argv: list[str], *, beam_args=()) -> int:
  """Parses `argv` (argv[0]: the program), runs the mode and returns the exit code;
  every known stop reason is one `error:` line on stderr, never a traceback."""
  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = ({sig: signal.signal(sig, _on_stop_signal) for sig in _STOP_MESSAGES}
              if in_main_thread else {})
  previous_unraisable, sys.unraisablehook = sys.unraisablehook, _log_unraisable
  for name in _QUIET_AFTER_A_COMMAND:  # a handler: records go on to the root's, if any,
    logger = logging.getLogger(name)   # and never to logging's last-resort stderr one
    if not logger.handlers:
      logger.addHandler(logging.NullHandler())
  fv = result = None
  try:
    fv = flags.FlagValues()
    define_flags(fv, sys_argv=argv)
    if set(argv[1:]) & set(HELP_ARGS):
      print(usage(fv, full="--helpfull" in argv))
      return 0
    try:
      rest = parse_flags(argv, fv)
    except flags.Error as e:
      _error(f"{e}\nsee --help")
      return 2
    if len(rest) > 1 and fv.mode != "mine":
      raise CommandLineError(f"unexpected arguments {rest[1:]}")
    beam_args = list(beam_args) + rest[1:]
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    config = config_from_flags(fv)
    with console.session(_log_dir(config, fv), fv.verbosity):
      try:
        if fv.mode == "compile":  # the topology's devices, not this machine's
          topology.reserve_cpu_devices(fv.topology or "")
        distributed.initialize_from_flags(fv)
        if fv.mode != "compile":
          _stages().check_platform(config, allow_cpu=fv.allow_cpu)
        result = run(config, fv, beam_args)
      except Exception as e:
        log.info("stopped by %s", type(e).__name__, exc_info=e)  # the details, in the log file
        raise
  except (ConfigError, DataError, CommandLineError) as e:
    _error(str(e))
    return 2
  except KeyboardInterrupt:
    _error("interrupted (Ctrl-C); a started training run resumes from its last checkpoint")
    return 130
  except Exception as e:  # noqa: BLE001  (one clean line for the known stop reasons)
    from esspr_jax.train import NonFiniteLossError  # noqa: PLC0415  (flax, optax: not at start)
    if isinstance(e, NonFiniteLossError):
      _error(str(e))
      return 3
    fault = disk_fault(e, fv["workdir"].value if fv is not None else None)
    if fault is None:
      raise
    _error(fault)
    return 2
  finally:
    sys.unraisablehook = previous_unraisable
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return EXIT_PREEMPTED if getattr(result, "stopped", None) == "preempted" else 0


def entry(argv: list[str] | None = None) -> None:
  """The `esspr-jax` console script (and `python -m esspr_jax.main`)."""
  console.quiet_native_logs()
  sys.exit(execute(list(sys.argv if argv is None else argv)))


def mine_entry(argv: list[str]) -> int:
  """`python -m esspr_jax.ingest.mining ...`: `esspr-jax --mode=mine ...`, with flags
  this command does not know passed on to Beam (as that module always did)."""
  fv = flags.FlagValues()
  define_flags(fv, sys_argv=argv)
  known, beam = [argv[0], "--mode=mine"], []
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    is_ours = (name in fv or name.startswith("config.") or
               (name.startswith("no") and name[2:] in fv) or not arg.startswith("-"))
    (known if is_ours else beam).append(arg)
  return execute(known, beam_args=beam)


def run_app(main) -> None:
  """absl's app.run for the recipes, but --help exits 0 (absl's exits 1) with the
  short usage."""
  if set(sys.argv[1:]) & set(HELP_ARGS):
    app.usage(shorthelp="--helpfull" not in sys.argv, writeto_stdout=True)
    sys.exit(0)
  app.run(main)


if __name__ == "__main__":
  entry()
