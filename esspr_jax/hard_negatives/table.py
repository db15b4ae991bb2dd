"""The mined table: for each training pair, `per_trigger` listing rows to add as
negatives, from the catalog embeddings (mine.py) and the same-style groups (catalog.py).

Mining runs once per distinct trigger listing. A trigger whose category holds fewer
non-positives than `per_trigger` takes the rest from the whole catalog; if even that
runs out, a slot repeats the trigger's best found (or, with none at all, row 0)."""
from typing import Tuple

import numpy as np

from esspr_jax.hard_negatives.catalog import TrainingCatalog
from esspr_jax.hard_negatives.mine import mine_nearest


def mine_table(catalog: TrainingCatalog, embeddings: np.ndarray, per_trigger: int, *,
               chunk_size: int = 1024, index_config=None) -> Tuple[np.ndarray, np.ndarray]:
  """(table int64 [pairs, per_trigger] of listing rows, scores float32 same shape).

  embeddings: [len(catalog), E], one row per listing (the same view for triggers and
  listings); `index_config` (eval.index): large categories through ScaNN (mine.py)."""
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.shape[0] != len(catalog):
    raise ValueError(f"mine_table: {embeddings.shape[0]} embeddings for a catalog of "
                     f"{len(catalog)} listings")
  triggers = np.unique(catalog.trigger_row)
  excluded = [catalog.positives(r) for r in triggers]
  rows, scores = mine_nearest(embeddings[triggers], embeddings, catalog.category[triggers],
                              catalog.category, excluded, per_trigger, chunk_size=chunk_size,
                              index_config=index_config)
  short = np.flatnonzero((rows < 0).any(axis=1))
  if short.size:  # too few in the category: the nearest non-positives anywhere
    anywhere, any_scores = mine_nearest(
        embeddings[triggers[short]], embeddings, np.zeros(short.size, np.int64),
        np.zeros(len(catalog), np.int64),
        [np.concatenate([excluded[q], rows[q][rows[q] >= 0]]) for q in short],
        per_trigger, chunk_size=chunk_size, index_config=index_config)
    for k, q in enumerate(short):
      have = rows[q][rows[q] >= 0]
      extra = anywhere[k][anywhere[k] >= 0][:per_trigger - have.size]
      filled = np.concatenate([have, extra])
      filled_scores = np.concatenate([scores[q][rows[q] >= 0], any_scores[k][:extra.size]])
      if filled.size == 0:
        filled, filled_scores = np.zeros(1, np.int64), np.zeros(1, np.float32)
      pad = per_trigger - filled.size
      rows[q] = np.concatenate([filled, np.repeat(filled[:1], pad)])
      scores[q] = np.concatenate([filled_scores, np.repeat(filled_scores[:1], pad)])
  at = np.searchsorted(triggers, catalog.trigger_row)
  return rows[at], scores[at]
