"""The nearest listings of each trigger in its own leaf category that are not its positives.

Pure numpy on host embeddings, exact: triggers are scored against their category's
listings in chunks of `chunk_size` triggers, so memory is [chunk, largest category].
Ties go to the lower listing row, so the table is a deterministic function of the
embeddings (a resumed run mines the same table).
"""
from typing import Sequence, Tuple

import numpy as np


def mine_nearest(queries: np.ndarray, listings: np.ndarray, query_category: np.ndarray,
                 listing_category: np.ndarray, excluded: Sequence[np.ndarray], n: int, *,
                 chunk_size: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
  """(rows int64 [Q, n], scores float32 [Q, n]) of the top-n listings by dot product.

  queries [Q, E], listings [L, E]; categories: integer codes [Q] and [L]; excluded[q]:
  the listing rows query q may not take (its positives, itself). Slots with no
  candidate left hold row -1 and score -inf."""
  queries = np.asarray(queries, np.float32)
  listings = np.asarray(listings, np.float32)
  query_category = np.asarray(query_category)
  listing_category = np.asarray(listing_category)
  if queries.ndim != 2 or listings.ndim != 2 or queries.shape[1] != listings.shape[1]:
    raise ValueError(f"mine_nearest: queries {queries.shape} and listings {listings.shape} "
                     "must be [Q, E] and [L, E] with one E")
  if query_category.shape != (len(queries),) or listing_category.shape != (len(listings),):
    raise ValueError("mine_nearest: one category per query and per listing, got "
                     f"{query_category.shape} and {listing_category.shape}")
  if len(excluded) != len(queries):
    raise ValueError(f"mine_nearest: {len(excluded)} exclusion lists for {len(queries)} queries")
  if n < 1 or chunk_size < 1:
    raise ValueError(f"mine_nearest: n and chunk_size must be >= 1, got {n}, {chunk_size}")
  rows = np.full((len(queries), n), -1, np.int64)
  scores = np.full((len(queries), n), -np.inf, np.float32)
  position = np.full(len(listings), -1, np.int64)  # listing row -> column in its category
  for category in np.unique(query_category):
    members = np.flatnonzero(listing_category == category)
    if members.size == 0:
      continue
    position[members] = np.arange(members.size)
    gallery = listings[members]
    asking = np.flatnonzero(query_category == category)
    for start in range(0, asking.size, chunk_size):
      chunk = asking[start:start + chunk_size]
      block = queries[chunk] @ gallery.T
      for r, q in enumerate(chunk):
        cols = position[np.asarray(excluded[q], np.int64)]
        block[r, cols[cols >= 0]] = -np.inf
      take = min(n, members.size)
      order = np.argsort(-block, axis=1, kind="stable")[:, :take]
      best = np.take_along_axis(block, order, axis=1)
      found = np.isfinite(best)
      rows[chunk, :take] = np.where(found, members[order], -1)
      scores[chunk, :take] = np.where(found, best, -np.inf)
    position[members] = -1
  return rows, scores
