"""Small predicates the config sections share when validating values."""
from esspr_jax.errors import ConfigError


def check(ok: bool, key: str, message: str) -> None:
  """Raises ConfigError naming `key` unless `ok`."""
  if not ok:
    raise ConfigError(key, message)


def is_int(value) -> bool:
  """True for ints, False for bools (a bool is an int to Python, never to a config)."""
  return isinstance(value, int) and not isinstance(value, bool)
