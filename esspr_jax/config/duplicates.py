"""Config section `duplicates`: --mode=duplicates (docs/retrieval.md, duplicate detection).

Keys:
  target_precision  the calibrated threshold is the smallest cosine whose precision on
                    the labelled pairs is >= this (the most recall at that precision)
  scope             'supplier': clusters join only one supplier's listings (one supplier
                    listing a product twice); 'all': across suppliers too
  top_k             neighbours per listing: the candidate pairs clustering looks at, and
                    the hard negatives of the demo world's labelled pairs
  view              the embedding compared: 'm' (image + title), 't' or 'i'
"""
import ml_collections

from esspr_jax.config.checks import in_unit, one_of, positive_int
from esspr_jax.config.constants import MODALITIES

SCOPES = ("supplier", "all")


def default_config(preset: str) -> ml_collections.ConfigDict:
  del preset
  c = ml_collections.ConfigDict()
  c.target_precision = 0.95
  c.scope = "supplier"
  c.top_k = 10
  c.view = "m"
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  d = config.duplicates
  in_unit(d.target_precision, "duplicates.target_precision", open_low=True)
  one_of(d.scope, "duplicates.scope", SCOPES)
  positive_int(d.top_k, "duplicates.top_k")
  one_of(d.view, "duplicates.view", MODALITIES)
