"""Error types users see. Each names the thing that is wrong, so a failure never
surfaces as an opaque shape error deep inside a jit."""


class ConfigError(ValueError):
  """A config key is unknown, missing or inconsistent. `key` is its dotted path."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config.{key}: {message}")
    self.key = key


class DataError(ValueError):
  """Input data is malformed (and `strict` mode, or the bad-fraction limit, forbids skipping)."""
