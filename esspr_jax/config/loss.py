"""Config section `loss`: which query->gallery pairs and extra terms train the model.

Layout (every key overridable from the command line, e.g.
`--config.loss.pairs.t_t.weight=1 --config.loss.pairs.t_t.kind=infonce`):
  pairs.<x>_<y>  for x, y in i/t/m (trigger view x vs recall view y), all nine listed:
                 kind 'hinge' (the paper's PPM) | 'infonce' | 'sigmoid'; weight (0 = off);
                 margin (hinge only).
  pdc.<t|i>      weight, margin: self-distinctiveness of the trigger's single view.
  plc.<t|i>      weight, margin; plc.top_k: locality consistency over top-k recalls.
  composed       kind 'infonce', weight (0 = off): the composed-query term (reference
                 photo + modifier words -> the wanted listing, away from the photo's own
                 image-only view; losses/composed.py) over its own
                 sub-batch of train.composed_batch_size triplets from
                 data.pipeline.composed_dataset; what interactive search learns from.
  weighting      kind 'fixed' (the weights above as they are) | 'fashionbert' (FashionBERT's
                 adaptive weights from the terms' values; alpha, default 1) |
                 'uncertainty' (one learned log-variance per term); losses/weighting.py.
  max_logit_scale  cap on the learnable log inverse temperature (InfoNCE, sigmoid).
  chunk_size       0 = plain B x B scores; > 0 = blocks of that many query rows.
  similarity_precision  matmul precision of the cosine scores.
See docs/losses.md.
"""
import logging
import math

import ml_collections

from esspr_jax.errors import ConfigError
from esspr_jax.config.loss_plan import PAIR_NAMES, SINGLE_VIEWS, available_modalities, plan_terms

# The paper's default set: fused, text and image triggers all matched to fused recalls.
PAPER_PAIRS = ("m_m", "t_m", "i_m")
# Our choices (the paper does not publish its margins): a cosine gap of 0.2 for the
# hinges; PLC tolerates |S - S'| up to 0.1 before it penalises.
HINGE_MARGIN = 0.2
PLC_MARGIN = 0.01
# The composed term is an InfoNCE; beside the paper's hinges (terms ~0.05 each) a weight
# of 1 swamps them (demo m-m MRR 0.27), 0.1 keeps them (0.54) and still switches the
# colour of interactive queries (docs/results.md).
COMPOSED_WEIGHT = 0.1
log = logging.getLogger(__name__)
_WARNED_ONE_TERM = set()  # (kind, term) pairs already warned about, so once per process
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
  # On in the demo, whose world writes modification triplets; elsewhere it needs a
  # composed dataset (docs/data.md), so it is off.
  config.composed = ml_collections.ConfigDict(
      {"kind": "infonce", "weight": COMPOSED_WEIGHT if preset == "demo" else 0.0})
  config.weighting = ml_collections.ConfigDict({"kind": "fixed", "alpha": 1.0})
  config.max_logit_scale = math.log(100.0)
  config.chunk_size = _CHUNK_SIZE.get(preset, 0)
  config.similarity_precision = "highest"
  return config


def text_only_infonce(config: ml_collections.ConfigDict) -> None:
  """Sets `config` (a `loss` section) to one in-batch InfoNCE on t->t, every other term
  off: the loss of a text-only model trained on title pairs (the text recipe's)."""
  for pair in config.pairs.keys():
    config.pairs[pair].weight = 0.0
  config.pairs.t_t.update(kind="infonce", weight=1.0)
  for view in SINGLE_VIEWS:
    config.pdc[view].weight = 0.0
    config.plc[view].weight = 0.0
  config.composed.weight = 0.0


def composed_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the composed-query term trains (it then needs its own sub-batch)."""
  composed = config.loss.get("composed")
  return bool(composed) and composed.weight > 0


def composed_rows_per_process(config: ml_collections.ConfigDict, process_count: int) -> int:
  """Each process's rows of the composed-query sub-batch; 0 when the term is off."""
  if not composed_enabled(config):
    return 0
  size = config.train.composed_batch_size
  if size % process_count:
    raise ConfigError("train.composed_batch_size", f"{size} is not divisible by the "
                      f"{process_count} processes")
  return size // process_count


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
  if plan.composed is not None:
    _validate_composed(config, available)
  _warn_if_nothing_to_balance(plan)


def _warn_if_nothing_to_balance(plan) -> None:
  """Adaptive weighting of a single term is allowed, but it balances nothing."""
  kind, names = plan.weighting.kind, [t.name for t in plan.all_terms]
  if kind == "fixed" or len(names) > 1 or (kind, names[0]) in _WARNED_ONE_TERM:
    return
  _WARNED_ONE_TERM.add((kind, names[0]))
  log.warning("loss.weighting.kind=%r with one loss term (%s): there is nothing to balance "
              "(%s)", kind, names[0], "its weight stays 1" if kind == "fashionbert" else
              "its learned weight only rescales the term's gradient")


def _validate_composed(config: ml_collections.ConfigDict, available) -> None:
  """The composed term needs the fused view, a sub-batch size and a dataset."""
  key = "loss.composed.weight"
  if "m" not in available:
    raise ConfigError(key, "the composed-query term needs the fused 'm' view (image and text "
                      "towers both enabled); set this weight to 0")
  if "train" not in config or "data" not in config:
    return  # a loss-only config (checked alone); the run config checks the rest
  size = config.train.get("composed_batch_size", 0)
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ConfigError("train.composed_batch_size", f"must be an int >= 1 while {key} > 0, "
                      f"got {size!r}")
  accum = config.train.grad_accum_steps
  if size % accum:
    raise ConfigError("train.composed_batch_size", f"must be divisible by "
                      f"train.grad_accum_steps={accum}, got {size}")
  if not config.data.pipeline.get("composed_dataset"):
    raise ConfigError("data.pipeline.composed_dataset", f"must name the composed-query "
                      f"dataset while {key} > 0 (e.g. 'composed_pairs')")
