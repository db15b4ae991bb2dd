"""Turns `config.loss` into a flat list of terms to compute.

One pure-Python reading of the config serves both `validate()` (before anything
compiles) and `loss_unit` (at trace time), so the two can never disagree about
which embeddings a term needs or what its key is called.
"""
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

from esspr_jax.config.checks import number
from esspr_jax.config.constants import MODALITIES
from esspr_jax.errors import ConfigError

# Query->gallery pairs, trigger modality x vs recall modality y. Config keys use '_'
# (`pairs.t_m`) so they can be overridden from the command line; logged names use '-'.
PAIR_NAMES = tuple(f"{x}_{y}" for x in MODALITIES for y in MODALITIES)
PAIR_KINDS = ("hinge", "infonce", "sigmoid")
# Logged prefix per pair kind: the batch hinge is the paper's PPM term.
KIND_PREFIX = {"hinge": "ppm", "infonce": "infonce", "sigmoid": "sigmoid"}
SINGLE_VIEWS = ("t", "i")  # single-modality views PDC / PLC regularise
PRECISIONS = ("default", "high", "highest")

_PAIR_FIELDS = ("kind", "weight", "margin")
_VIEW_FIELDS = ("weight", "margin")
_SECTION_FIELDS = ("pairs", "pdc", "plc", "max_logit_scale", "chunk_size",
                   "similarity_precision")
# Optional section: the composed-query term (trigger photo + modifier words -> target).
_COMPOSED_FIELDS = ("kind", "weight")
COMPOSED_KINDS = ("infonce",)
# (side, modality) of the composed term, rows of the `composed` sub-batch: the fused
# view of (reference photo, modifier words) against the fused view of the target
# listing, with the reference photo's image-only view as its hard negative.
COMPOSED_QUERY = ("composed_trigger", "m")
COMPOSED_TARGET = ("composed_recall", "m")
COMPOSED_REFERENCE = ("composed_trigger", "i")
# Optional section: how the terms add up (losses/weighting.py). Missing keys take these.
WEIGHTING_KINDS = ("fixed", "fashionbert", "uncertainty")
_WEIGHTING_DEFAULTS = {"kind": "fixed", "alpha": 1.0}

# (side, modality): which embedding a term reads.
Ref = Tuple[str, str]


@dataclasses.dataclass(frozen=True)
class TermSpec:
  """One weighted loss term.

  kind: 'hinge' (PPM, PDC), 'infonce', 'sigmoid' or 'locality' (PLC).
  query rows are scored against gallery rows; for 'locality' `anchor` is the fused
  trigger view whose top-k neighbourhood the query view must keep.
  """
  name: str
  key: str
  kind: str
  weight: float
  margin: float
  query: Ref
  gallery: Ref
  anchor: Optional[Ref] = None

  @property
  def refs(self) -> Tuple[Ref, ...]:
    return (self.query, self.gallery) + ((self.anchor,) if self.anchor else ())


@dataclasses.dataclass(frozen=True)
class WeightingSpec:
  """`loss.weighting`: kind in WEIGHTING_KINDS; alpha: FashionBERT's c_i = alpha*K - p_i^2."""
  kind: str = "fixed"
  alpha: float = 1.0


@dataclasses.dataclass(frozen=True)
class LossPlan:
  terms: Tuple[TermSpec, ...]
  top_k: int
  max_logit_scale: float
  chunk_size: int
  precision: str
  # The composed-query term, over its own sub-batch (None: off). See docs/losses.md.
  composed: Optional[TermSpec] = None
  weighting: WeightingSpec = WeightingSpec()

  @property
  def all_terms(self) -> Tuple[TermSpec, ...]:
    return self.terms + ((self.composed,) if self.composed else ())

  def views(self) -> Dict[str, Tuple[str, ...]]:
    """The modalities each side must be embedded in: exactly what the terms read.

    Sides are 'trigger' and 'recall' (the pairs) and, with the composed term on,
    'composed_trigger' / 'composed_recall' (its sub-batch). The train step embeds
    these and nothing else."""
    needed: Dict[str, set] = {}
    for term in self.all_terms:
      for side, modality in term.refs:
        needed.setdefault(side, set()).add(modality)
    return {side: tuple(m for m in MODALITIES if m in wanted)
            for side, wanted in sorted(needed.items())}


def _weight_and_margin(entry: Mapping[str, Any], key: str) -> Tuple[float, float]:
  return (float(number(entry, "weight", f"{key}.weight", minimum=0.0)),
          float(number(entry, "margin", f"{key}.margin", minimum=0.0)))


def _check_fields(section: Any, allowed: Tuple[str, ...], key: str, *,
                  required: bool = True) -> None:
  """Unknown keys are always errors; missing ones only where `required`."""
  if not hasattr(section, "keys"):
    raise ConfigError(key, f"must be a dict with keys {allowed}, got {section!r}")
  unknown = sorted(set(section.keys()) - set(allowed))
  if unknown:
    raise ConfigError(f"{key}.{unknown[0]}", f"unknown key; allowed: {allowed}")
  missing = [f for f in allowed if f not in section]
  if required and missing:
    raise ConfigError(f"{key}.{missing[0]}", "is missing")


def plan_terms(loss_cfg: Any) -> LossPlan:
  """Reads and checks `config.loss`; raises ConfigError naming the bad key.

  Terms with weight 0 are switched off and left out of the plan.
  """
  _check_fields(loss_cfg, _SECTION_FIELDS + ("composed", "weighting"), "loss",
                required=False)
  missing = [f for f in _SECTION_FIELDS if f not in loss_cfg]
  if missing:
    raise ConfigError(f"loss.{missing[0]}", "is missing")
  # A pair or view left out of the config is simply off (weight 0).
  _check_fields(loss_cfg["pairs"], PAIR_NAMES, "loss.pairs", required=False)
  _check_fields(loss_cfg["pdc"], SINGLE_VIEWS, "loss.pdc", required=False)
  _check_fields(loss_cfg["plc"], SINGLE_VIEWS + ("top_k",), "loss.plc", required=False)

  terms = []
  for pair in PAIR_NAMES:
    if pair not in loss_cfg["pairs"]:
      continue
    key = f"loss.pairs.{pair}"
    entry = loss_cfg["pairs"][pair]
    _check_fields(entry, _PAIR_FIELDS, key)
    kind = entry["kind"]
    if kind not in PAIR_KINDS:
      raise ConfigError(f"{key}.kind", f"must be one of {PAIR_KINDS}, got {kind!r}")
    weight, margin = _weight_and_margin(entry, key)
    if weight > 0:
      x, y = pair.split("_")
      terms.append(TermSpec(f"{KIND_PREFIX[kind]}/{x}-{y}", key, kind, weight, margin,
                            ("trigger", x), ("recall", y)))

  # PDC: the trigger's single view against the fused triggers (hinge); PLC: its scores
  # against the fused recalls, around the fused trigger's neighbourhood (locality).
  for section, kind, gallery, anchor in (("pdc", "hinge", ("trigger", "m"), None),
                                         ("plc", "locality", ("recall", "m"), ("trigger", "m"))):
    for view in SINGLE_VIEWS:
      if view not in loss_cfg[section]:
        continue
      key = f"loss.{section}.{view}"
      _check_fields(loss_cfg[section][view], _VIEW_FIELDS, key)
      weight, margin = _weight_and_margin(loss_cfg[section][view], key)
      if weight > 0:
        terms.append(TermSpec(f"{section}/{view}", key, kind, weight, margin,
                              ("trigger", view), gallery, anchor=anchor))

  top_k = number(loss_cfg["plc"], "top_k", "loss.plc.top_k", minimum=1, integer=True)
  max_logit_scale = number(loss_cfg, "max_logit_scale", "loss.max_logit_scale",
                            minimum=0.0)
  chunk_size = number(loss_cfg, "chunk_size", "loss.chunk_size", minimum=0, integer=True)
  precision = loss_cfg["similarity_precision"]
  if precision not in PRECISIONS:
    raise ConfigError("loss.similarity_precision",
                      f"must be one of {PRECISIONS}, got {precision!r}")
  if not terms:
    raise ConfigError("loss.pairs", "no loss term has a weight > 0; enable at least one "
                      "pair (e.g. --config.loss.pairs.m_m.weight=1)")
  composed = _composed_term(loss_cfg)
  count = len(terms) + (composed is not None)
  return LossPlan(tuple(terms), int(top_k), float(max_logit_scale), int(chunk_size),
                  precision, composed, _weighting(loss_cfg, count))


def _weighting(loss_cfg: Any, count: int) -> WeightingSpec:
  """`loss.weighting` (optional; missing keys take their defaults)."""
  if "weighting" not in loss_cfg:
    return WeightingSpec()
  entry = loss_cfg["weighting"]
  _check_fields(entry, tuple(_WEIGHTING_DEFAULTS), "loss.weighting", required=False)
  kind = entry.get("kind", _WEIGHTING_DEFAULTS["kind"])
  if kind not in WEIGHTING_KINDS:
    raise ConfigError("loss.weighting.kind",
                      f"must be one of {WEIGHTING_KINDS}, got {kind!r}")
  alpha = float(number({"alpha": entry.get("alpha", _WEIGHTING_DEFAULTS["alpha"])}, "alpha",
                       "loss.weighting.alpha", minimum=0.0))
  # c_i = alpha*K - p_i^2 with p_i up to 1: alpha*K > 1 keeps every weight positive.
  if kind == "fashionbert" and count > 1 and alpha * count <= 1.0:
    raise ConfigError("loss.weighting.alpha", f"must be > 1/K = 1/{count} (the number of "
                      f"terms) so every FashionBERT weight stays positive, got {alpha!r}")
  return WeightingSpec(kind, alpha)


def _composed_term(loss_cfg: Any) -> Optional[TermSpec]:
  if "composed" not in loss_cfg:
    return None
  key = "loss.composed"
  entry = loss_cfg["composed"]
  _check_fields(entry, _COMPOSED_FIELDS, key)
  kind = entry["kind"]
  if kind not in COMPOSED_KINDS:
    raise ConfigError(f"{key}.kind", f"must be one of {COMPOSED_KINDS}, got {kind!r}")
  weight = number(entry, "weight", f"{key}.weight", minimum=0.0)
  if weight == 0:
    return None
  return TermSpec(f"{KIND_PREFIX[kind]}/composed", key, "composed_" + kind, float(weight),
                  0.0, COMPOSED_QUERY, COMPOSED_TARGET, anchor=COMPOSED_REFERENCE)


def available_modalities(config: Any) -> Tuple[str, ...]:
  """Modalities the model section says it produces (defensive: the model section
  may not define `image`/`text` at all, in which case both count as enabled)."""
  model = config.get("model", {}) if hasattr(config, "get") else {}
  model = model if model is not None else {}
  image = model.get("image", {}) or {}
  text = model.get("text", {}) or {}
  has_image = bool(image.get("enabled", True))
  has_text = bool(text.get("enabled", True))
  if has_image and has_text:
    return MODALITIES
  return tuple(m for m, on in (("i", has_image), ("t", has_text)) if on)
