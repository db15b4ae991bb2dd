"""The `tiny` preset. Override any key from the command line, e.g. --config.train.steps=10."""
from esspr_jax.config import compose


def get_config():
  return compose("tiny")
