"""`python -m esspr_jax.main ...` is the `esspr-jax` command (esspr_jax/cli.py); this
module keeps that spelling, and the names older callers import, working."""
from esspr_jax.cli import (  # noqa: F401
    MODES, config_from_flags, define_flags, entry, execute, parse_flags, run)

_STAGE_NAMES = ("Paths", "build", "eval_batch_sharding", "make_world", "mine", "prepare_data",
                "run_all", "shared_tokenizer", "summary", "tokenizer", "train")


def __getattr__(name: str):
  """The stage names older callers import from here, loaded on first use, so that
  `python -m esspr_jax.main --help` starts as fast as `esspr-jax --help`."""
  if name in _STAGE_NAMES:
    from esspr_jax import stages  # noqa: PLC0415  (start-up time, see the docstring)
    return getattr(stages, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
  entry()
