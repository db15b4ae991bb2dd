"""Config section `data.pipeline` (placeholder: its owner fills the keys)."""
import ml_collections


def default_config(preset: str) -> ml_collections.ConfigDict:
  del preset
  return ml_collections.ConfigDict()


def validate(config: ml_collections.ConfigDict) -> None:
  del config
