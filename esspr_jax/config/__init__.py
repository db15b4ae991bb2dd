"""Run configs are composed from one section per subsystem.

Each section module exposes `default_config(preset)` for the presets
('tiny', 'demo', 'base', 'large') and `validate(config)` that raises
`esspr_jax.errors.ConfigError` naming the offending key. `configs/*.py` call
`compose(preset)`; `validate_config` runs before anything compiles.

This package is a leaf: it imports no other esspr_jax package (only `esspr_jax.errors`),
so any room may read a config and the config never reaches back into the code.
"""
import ml_collections

from esspr_jax.config.checks import check, finite_floats, known_keys
from esspr_jax.config import data as data_section
from esspr_jax.config import duplicates as duplicates_section
from esspr_jax.config import eval as eval_section
from esspr_jax.config import loss as loss_section
from esspr_jax.config import model as model_section
from esspr_jax.config import train as train_section

PRESETS = ("tiny", "demo", "base", "large")
# Top-level keys besides the sections: `recipe` is a recipe's own section (configs/finetune_*).
_TOP_LEVEL = ("preset", "seed", "recipe")
_SECTIONS = {
    "model": model_section,
    "loss": loss_section,
    "data": data_section,
    "train": train_section,
    "eval": eval_section,
    "duplicates": duplicates_section,
}


def compose(preset: str) -> ml_collections.ConfigDict:
  """The full run config for a preset, locked so unknown keys raise on override."""
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.seed = 0
  for name, section in _SECTIONS.items():
    config[name] = section.default_config(preset)
  config.lock()
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every section; raises ConfigError naming the first bad key.

  A key no section defines is an error (a typo, or a setting nothing reads); `model`
  and `loss` check their own layouts, which have optional entries. No float anywhere
  may be NaN or inf."""
  for key in config.keys():
    check(key in _SECTIONS or key in _TOP_LEVEL, key,
          f"unknown top-level key; known: {sorted(_SECTIONS) + list(_TOP_LEVEL)}")
  finite_floats(config)
  preset = config.get("preset", "tiny")
  check(preset in PRESETS, "preset", f"must be one of {PRESETS}, got {preset!r}")
  for name in ("data", "train", "eval", "duplicates"):
    if name in config:
      known_keys(config[name], _SECTIONS[name].default_config(preset), name)
  for section in _SECTIONS.values():
    section.validate(config)
