"""`python -m esspr_jax.main ...` is the `esspr-jax` command (esspr_jax/cli.py); this
module keeps that spelling, and the names older callers import, working."""
from esspr_jax.cli import (  # noqa: F401
    MODES, config_from_flags, define_flags, entry, execute, parse_flags, run)
from esspr_jax.stages import (  # noqa: F401
    Paths, build, eval_batch_sharding, make_world, mine, prepare_data, run_all,
    shared_tokenizer, summary, tokenizer, train)

if __name__ == "__main__":
  entry()
