"""The training batch's layout, named once, and its abstract shapes from a config.

A training batch (input/pipeline.py builds it; docs/architecture.md) is
    {VALID: bool[B], TRIGGER: side, RECALL: side,
     COMPOSED: {TRIGGER: side, RECALL: side}   # only while loss.composed.weight > 0
     HARD_NEGATIVE: side}                      # only with train.hard_negatives.enabled
where a side is {text_ids, text_mask: int32[rows, max_len], text_empty: bool[rows],
image: uint8[rows, size, size, 3] (image models only)}. `abstract_train_batch` gives
that structure as ShapeDtypeStructs, so a step can be compiled for a topology without
reading a single example (compile_check.py).
"""
from __future__ import annotations

import jax
import numpy as np

from esspr_jax.models.model import example_side

VALID = "valid"
TRIGGER = "trigger"
RECALL = "recall"
COMPOSED = "composed"
HARD_NEGATIVE = "hard_negative"
PAIR_SIDES = (TRIGGER, RECALL)


def abstract_side(model_config, rows: int) -> dict:
  """One side of `rows` examples as ShapeDtypeStructs (no 'image' for a text-only model)."""
  side = example_side(model_config, 1)
  if not model_config.image.enabled:
    side.pop("image")
  return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype) for k, v in side.items()}


def abstract_train_batch(config, rows: int, composed_rows: int = 0,
                         hard_negative_rows: int = 0) -> dict:
  """A training batch of `rows` pairs as ShapeDtypeStructs, with the composed
  sub-batch and the hard-negative side when their row counts are non-zero."""
  batch = {VALID: jax.ShapeDtypeStruct((rows,), np.dtype(bool)),
           **{s: abstract_side(config.model, rows) for s in PAIR_SIDES}}
  if composed_rows:
    batch[COMPOSED] = {s: abstract_side(config.model, composed_rows) for s in PAIR_SIDES}
  if hard_negative_rows:
    batch[HARD_NEGATIVE] = abstract_side(config.model, hard_negative_rows)
  return batch


def with_hard_negative_side(views) -> dict:
  """The step's views plus HARD_NEGATIVE, embedded like the recall side (the mined
  rows are gallery listings, as recalls are)."""
  return dict(views) | {HARD_NEGATIVE: tuple(views[RECALL])}
