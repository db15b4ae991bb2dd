"""The nearest listings of each trigger in its own leaf category that are not its positives.

On host embeddings, per category. Exact by default: triggers are scored against their
category's listings in chunks of `chunk_size` triggers, so memory is [chunk, largest
category]; ties go to the lower listing row, so the table is a deterministic function
of the embeddings (a resumed run mines the same table). With `index_config` (the
eval's `eval.index`) a category of at least `exact_max_gallery` listings is searched
the way retrieval searches a large gallery: a ScaNN index built and tuned to
`eval.index.scann.target_recall` (retrieval/index.py), asked for n plus the most
exclusions of any of its triggers, the exclusions dropped; a trigger left with fewer
than n is scored exactly (one row, so memory stays [1, category]).
"""
import logging
from typing import Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)


def mine_nearest(queries: np.ndarray, listings: np.ndarray, query_category: np.ndarray,
                 listing_category: np.ndarray, excluded: Sequence[np.ndarray], n: int, *,
                 chunk_size: int = 1024, index_config=None) -> Tuple[np.ndarray, np.ndarray]:
  """(rows int64 [Q, n], scores float32 [Q, n]) of the top-n listings by dot product.

  queries [Q, E], listings [L, E]; categories: integer codes [Q] and [L]; excluded[q]:
  the listing rows query q may not take (its positives, itself). Slots with no
  candidate left hold row -1 and score -inf. `index_config`: see the module doc."""
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
    if index_config is not None and members.size >= max(index_config.exact_max_gallery, 2):
      columns = [position[np.asarray(excluded[q], np.int64)] for q in asking]
      got_rows, got_scores = _mine_indexed(queries[asking], gallery,
                                           [c[c >= 0] for c in columns], n, index_config)
      rows[asking] = np.where(got_rows >= 0, members[got_rows], -1)
      scores[asking] = got_scores
      position[members] = -1
      continue
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


def _mine_indexed(queries: np.ndarray, gallery: np.ndarray, excluded: Sequence[np.ndarray],
                  n: int, index_config) -> Tuple[np.ndarray, np.ndarray]:
  """One category through a tuned ScaNN index: (gallery columns [Q, n], scores)."""
  from esspr_jax.retrieval.index import build_index  # noqa: PLC0415  (ScaNN: only here)
  index, report = build_index(gallery, index_config, tune_queries=queries)
  depth = min(gallery.shape[0], n + max((len(e) for e in excluded), default=0))
  ids, found = index.search(queries, depth)
  rows = np.full((len(queries), n), -1, np.int64)
  scores = np.full((len(queries), n), -np.inf, np.float32)
  exact_rows = 0
  for q in range(len(queries)):
    keep = (ids[q] >= 0) & ~np.isin(ids[q], excluded[q])
    take_ids, take_scores = ids[q][keep][:n], found[q][keep][:n]
    if take_ids.size < min(n, gallery.shape[0] - np.unique(excluded[q]).size):
      exact_rows += 1  # ScaNN's candidates ran out: this trigger exactly
      one_rows, one_scores = mine_nearest(queries[q:q + 1], gallery, np.zeros(1),
                                          np.zeros(len(gallery)), [excluded[q]], n)
      keep = one_rows[0] >= 0
      take_ids, take_scores = one_rows[0][keep], one_scores[0][keep]
    rows[q, :take_ids.size] = take_ids
    scores[q, :take_ids.size] = take_scores
  log.info("hard negatives: a category of %d listings via %s (recall %.3f on %d triggers; "
           "%d scored exactly)", gallery.shape[0], report["kind"], report["recall"],
           len(queries), exact_rows)
  return rows, scores
