"""The one validation toolkit the config sections share.

Every helper raises `ConfigError` naming the full key (`train.batch_size`), so a bad
value is reported where the user wrote it, before anything compiles.
"""
import math
from typing import Any, Iterable, Mapping

from esspr_jax.errors import ConfigError


def check(ok: bool, key: str, message: str) -> None:
  """Raises ConfigError naming `key` unless `ok`."""
  if not ok:
    raise ConfigError(key, message)


def is_int(value) -> bool:
  """True for ints, False for bools (a bool is an int to Python, never to a config)."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  """True for ints and floats, False for bools."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value, key: str, minimum: int = 1) -> int:
  """`value` if it is an int >= minimum (0 for counts that may be off)."""
  check(is_int(value) and value >= minimum, key,
        f"must be an integer >= {minimum}, got {value!r}")
  return value


def in_unit(value, key: str, open_low: bool = False) -> None:
  """A fraction: in [0, 1], or (0, 1] with `open_low`."""
  ok = is_number(value) and (0 < value <= 1 if open_low else 0 <= value <= 1)
  check(ok, key, f"must be in {'(0' if open_low else '[0'}, 1], got {value!r}")


def one_of(value, key: str, choices: Iterable) -> None:
  choices = tuple(choices)
  check(value in choices, key, f"must be one of {choices}, got {value!r}")


def number(section: Mapping[str, Any], field: str, key: str, *, minimum: float,
           integer: bool = False) -> float:
  """section[field] as a finite number >= minimum; a missing field is an error too."""
  check(field in section, key, "is missing")
  value = section[field]
  ok_type = is_int(value) if integer else is_number(value)
  check(ok_type, key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
  check(math.isfinite(value) and value >= minimum, key,
        f"must be finite and >= {minimum}, got {value!r}")
  return value


def finite_floats(section: Any, key: str = "") -> None:
  """Every float under `section` (also inside a tuple or list) is finite: NaN or inf is
  never a setting, and a range check like `x > 0` would let inf (NaN: any `not x <= y`)
  through."""
  for name in section.keys():
    value, path = section[name], f"{key}.{name}" if key else name
    if hasattr(value, "keys"):
      finite_floats(value, path)
      continue
    values = value if isinstance(value, (tuple, list)) else (value,)
    check(all(math.isfinite(v) for v in values if isinstance(v, float)), path,
          f"must be finite, got {value!r}")


def known_keys(section: Any, reference: Any, key: str, *, required: bool = False,
               open_keys: Iterable[str] = ()) -> None:
  """Unknown keys of `section` (against `reference`, recursively) are errors, so a typo
  or a key nothing reads never passes silently; missing ones too where `required`.

  `open_keys`: sub-sections (dotted, relative to `key`) whose own keys are free, e.g.
  a table of user-named entries."""
  check(hasattr(section, "keys"), key, f"must be a section, got {section!r}")
  open_keys = tuple(open_keys)
  allowed = sorted(reference.keys())
  for name in section.keys():
    check(name in reference, f"{key}.{name}", f"unknown key; known keys: {allowed}")
  if required:
    for name in reference.keys():
      check(name in section, f"{key}.{name}", "missing")
  for name in section.keys():
    sub = reference[name]
    if hasattr(sub, "keys") and name not in open_keys:
      inner = tuple(k.split(".", 1)[1] for k in open_keys if k.startswith(name + "."))
      known_keys(section[name], sub, f"{key}.{name}", required=required, open_keys=inner)
