"""Mined hard negatives as extra gallery rows of the pair terms.

The step may carry a side 'hard_negative' ({modality: [R, E]}, any R): listings mined
from the training catalog near each trigger but not its positives. Every pair term
whose gallery is a recall view (hinge, InfoNCE, sigmoid) then reads the gallery
concat(recall[y], hard_negative[y]): its first B rows hold the positives and the
extra rows are negatives for every query. The extended gallery has its own key, so
PLC, which also reads the recall's fused view, keeps the plain one.
"""
from typing import Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp

from esspr_jax.unit_norm import l2_normalize

HARD_SIDE = "hard_negative"
EXTENDED_KINDS = ("hinge", "infonce", "sigmoid")

Ref = Tuple[str, str]


def _extended(term) -> bool:
  return term.kind in EXTENDED_KINDS and term.gallery[0] == "recall"


def extended_ref(ref: Ref) -> Ref:
  return (f"{ref[0]}+{HARD_SIDE}", ref[1])


def hard_negative_rows(terms: Sequence, sides: Mapping[str, Mapping[str, jax.Array]]
                       ) -> Dict[Ref, jax.Array]:
  """The normalised hard-negative views the terms read; {} without that side."""
  if HARD_SIDE not in sides:
    return {}
  hard = sides[HARD_SIDE]
  out = {}
  for term in terms:
    if not _extended(term):
      continue
    modality = term.gallery[1]
    if modality not in hard:
      raise ValueError(f"loss_unit: term {term.name!r} reads the recall's {modality!r} "
                       f"view, so side {HARD_SIDE!r} needs it too; it has {sorted(hard)}")
    x, gallery = hard[modality], sides["recall"][modality]
    if x.ndim != 2 or x.shape[1] != gallery.shape[1]:
      raise ValueError(f"loss_unit: {HARD_SIDE}[{modality!r}] must be [R, E] with the "
                       f"recall's E={gallery.shape[1]}, got {tuple(x.shape)}")
    out[(HARD_SIDE, modality)] = l2_normalize(x)
  return out


def extend_galleries(terms: Sequence, galleries: Mapping[Ref, jax.Array]
                     ) -> Tuple[Dict[Ref, jax.Array], Dict[str, Tuple[Ref, int]]]:
  """Galleries plus the extended ones, and for each extended term (its gallery key,
  its column count). Nothing changes when `galleries` hold no hard-negative rows."""
  out = dict(galleries)
  per_term = {}
  for term in terms:
    hard_ref = (HARD_SIDE, term.gallery[1])
    if not _extended(term) or hard_ref not in galleries:
      continue
    key = extended_ref(term.gallery)
    if key not in out:
      out[key] = jnp.concatenate([galleries[term.gallery], galleries[hard_ref]], axis=0)
    per_term[term.name] = (key, out[key].shape[0])
  return out, per_term
