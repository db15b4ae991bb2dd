"""Random in-memory batches in the real model's input format (not a test).

Shapes and dtypes come from `esspr_jax.models.model.example_side`, so the batches
follow the model config (image size, title length, vocabulary); each batch is a pure
function of its index, so separate runs see the very same data.
"""
import numpy as np

from esspr_jax.models.model import example_side


def random_side(model_config, rng: np.random.Generator, rows: int) -> dict:
  """One side: random RGB photos and random titles of 1..max_len-2 words."""
  template = example_side(model_config, rows)
  length = template["text_ids"].shape[1]
  words = rng.integers(1, length - 1, size=rows)
  mask = (np.arange(length)[None, :] < (words + 2)[:, None]).astype(np.int32)
  ids = rng.integers(1, model_config.text.vocab_size, size=template["text_ids"].shape)
  return {
      "image": rng.integers(0, 256, size=template["image"].shape, dtype=np.uint8),
      "text_ids": (ids * mask).astype(template["text_ids"].dtype),
      "text_mask": mask,
      "text_empty": np.zeros_like(template["text_empty"]),
  }


def make_batch(model_config, index: int, rows: int, composed_rows: int = 0) -> dict:
  """Batch `index`: `rows` (trigger, recall) pairs and, with `composed_rows`, the
  composed-query sub-batch under 'composed', as the input pipeline builds it."""
  rng = np.random.default_rng(7000 + index)
  batch = {"trigger": random_side(model_config, rng, rows),
           "recall": random_side(model_config, rng, rows)}
  if composed_rows:
    batch["composed"] = {"trigger": random_side(model_config, rng, composed_rows),
                         "recall": random_side(model_config, rng, composed_rows)}
  return batch
