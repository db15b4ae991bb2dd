"""Config section `loss`: which query->gallery pairs and extra terms train the model.

Layout (every key overridable from the command line, e.g.
`--config.loss.pairs.t_t.weight=1 --config.loss.pairs.t_t.kind=infonce`):
  pairs.<x>_<y>  for x, y in i/t/m (trigger view x vs recall view y), all nine listed:
                 kind 'hinge' (the paper's PPM) | 'infonce' | 'sigmoid'; weight (0 = off);
                 margin (hinge only).
  pdc.<t|i>      weight, margin: self-distinctiveness of the trigger's single view.
  plc.<t|i>      weight, margin; plc.top_k: locality consistency over top-k recalls.
  max_logit_scale  cap on the learnable log inverse temperature (InfoNCE, sigmoid).
  chunk_size       0 = plain B x B scores; > 0 = blocks of that many query rows.
  similarity_precision  matmul precision of the cosine scores.
See docs/losses.md.
"""
import math

import ml_collections

from esspr_jax.errors import ConfigError
from esspr_jax.losses.plan import PAIR_NAMES, SINGLE_VIEWS, available_modalities, plan_terms

# The paper's default set: fused, text and image triggers all matched to fused recalls.
PAPER_PAIRS = ("m_m", "t_m", "i_m")
# Our choices (the paper does not publish its margins): a cosine gap of 0.2 for the
# hinges; PLC tolerates |S - S'| up to 0.1 before it penalises.
HINGE_MARGIN = 0.2
PLC_MARGIN = 0.01
# Block size for the chunked scores where global batches reach the thousands.
_CHUNK_SIZE = {"tiny": 0, "demo": 0, "base": 1024, "large": 1024}


def default_config(preset: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.pairs = ml_collections.ConfigDict({
      pair: {"kind": "hinge", "weight": 1.0 if pair in PAPER_PAIRS else 0.0,
             "margin": HINGE_MARGIN}
      for pair in PAIR_NAMES})
  config.pdc = ml_collections.ConfigDict(
      {view: {"weight": 1.0, "margin": HINGE_MARGIN} for view in SINGLE_VIEWS})
  config.plc = ml_collections.ConfigDict(
      {view: {"weight": 1.0, "margin": PLC_MARGIN} for view in SINGLE_VIEWS})
  config.plc.top_k = 10
  config.max_logit_scale = math.log(100.0)
  config.chunk_size = _CHUNK_SIZE.get(preset, 0)
  config.similarity_precision = "highest"
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks config.loss, and that every enabled term's embeddings exist in config.model."""
  if "loss" not in config:
    raise ConfigError("loss", "section is missing")
  plan = plan_terms(config.loss)
  available = available_modalities(config)
  for term in plan.terms:
    for side, modality in term.refs:
      if modality not in available:
        raise ConfigError(
            f"{term.key}.weight",
            f"term {term.name!r} uses the {side}'s {modality!r} embedding, but the model "
            f"only produces {list(available)} (config.model image/text enabled flags); "
            "set this weight to 0")
