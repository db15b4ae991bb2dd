"""`python -m esspr_jax.ingest.mining` is `esspr-jax --mode=mine`: one entry point and one
error handling (esspr_jax/cli.py); flags that command does not know go to Beam. The
script lives apart from the library (`__init__.py`) so that only it imports the command
line, which imports the library: no circle."""
import sys

from esspr_jax import cli

if __name__ == "__main__":
  sys.exit(cli.mine_entry(sys.argv))
