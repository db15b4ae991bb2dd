"""Run configs are composed from one section per subsystem.

Each section module exposes `default_config(preset)` for the presets
('tiny', 'demo', 'base', 'large') and `validate(config)` that raises
`esspr_jax.errors.ConfigError` naming the offending key. `configs/*.py` call
`compose(preset)`; `validate_config` runs before anything compiles.
"""
import ml_collections

from esspr_jax.config import data as data_section
from esspr_jax.config import eval as eval_section
from esspr_jax.config import loss as loss_section
from esspr_jax.config import model as model_section
from esspr_jax.config import train as train_section

PRESETS = ("tiny", "demo", "base", "large")
_SECTIONS = {
    "model": model_section,
    "loss": loss_section,
    "data": data_section,
    "train": train_section,
    "eval": eval_section,
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
  """Checks every section; raises ConfigError naming the first bad key."""
  for section in _SECTIONS.values():
    section.validate(config)
