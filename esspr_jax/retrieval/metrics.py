"""Retrieval metrics: pure NumPy functions of scores, ranks and top-k lists.

Conventions (the table depends on them, so they are fixed here and documented in
docs/retrieval.md):
- A rank is 1-based. Ties are broken *pessimistically*: every other gallery item whose
  score is >= the positive's score is counted as ranked above it, so a model that gives
  everything the same score gets rank = gallery size, not 1.
- A query whose positive is absent from the gallery (target = ABSENT) has rank infinity:
  reciprocal rank 0 and a miss at every cutoff. It stays in the denominator.
- `ignore[q]` lists gallery indices that do not compete with query q's positive (the
  query's own listing when it is also in the gallery, and its other annotated
  positives); padded with ABSENT.
- From a top-k list (ScaNN or exact), a positive missing from the list has rank
  infinity, so MRR from lists is MRR truncated at the list depth.
"""
from typing import Sequence

import numpy as np

ABSENT = -1


def _ignore_mask(ignore: np.ndarray | None, num_queries: int, num_gallery: int) -> np.ndarray:
  mask = np.zeros((num_queries, num_gallery), bool)
  if ignore is not None:
    ignore = np.asarray(ignore)
    rows, cols = np.nonzero(ignore != ABSENT)
    mask[rows, ignore[rows, cols]] = True
  return mask


def pessimistic_ranks(scores: np.ndarray, target: np.ndarray,
                      ignore: np.ndarray | None = None) -> np.ndarray:
  """Ranks of each query's positive in a dense [Q, G] score matrix (small galleries, tests).

  Returns float64 [Q]: 1 + the number of competing items scoring >= the positive;
  inf where target is ABSENT.
  """
  scores = np.asarray(scores)
  target = np.asarray(target)
  q, g = scores.shape
  ranks = np.full(q, np.inf)
  present = target != ABSENT
  if np.any(target >= g) or np.any(target < ABSENT):
    raise ValueError(f"target indices must be in [-1, {g}), got {target}")
  competing = ~_ignore_mask(ignore, q, g)
  competing[np.arange(q)[present], target[present]] = False
  rows = np.nonzero(present)[0]
  positive = scores[rows, target[rows]][:, None]
  ranks[rows] = 1 + np.sum((scores[rows] >= positive) & competing[rows], axis=1)
  return ranks


def ranks_from_topk(topk_ids: np.ndarray, topk_scores: np.ndarray, target: np.ndarray,
                    ignore: np.ndarray | None = None) -> np.ndarray:
  """Ranks of each query's positive within its returned top-k list (ids < 0 are padding).

  Pessimistic within the list; inf if the positive is absent from the gallery or was
  not returned.
  """
  topk_ids = np.asarray(topk_ids)
  topk_scores = np.asarray(topk_scores)
  target = np.asarray(target)
  is_target = (topk_ids == target[:, None]) & (target[:, None] != ABSENT)
  competing = (topk_ids >= 0) & ~is_target
  if ignore is not None:
    ignore = np.asarray(ignore)
    ignored = np.any((topk_ids[:, :, None] == ignore[:, None, :]) & (ignore[:, None, :] != ABSENT),
                     axis=2)
    competing &= ~ignored
  found = is_target.any(axis=1)
  positive = np.where(is_target, topk_scores, np.inf).min(axis=1, initial=np.inf)
  count = np.sum(competing & (topk_scores >= positive[:, None]), axis=1)
  return np.where(found, 1.0 + count, np.inf)


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10, 20)) -> dict[str, float]:
  """MRR and Recall@K over all queries (absent positives count as misses)."""
  ranks = np.asarray(ranks, np.float64)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"need a non-empty 1-d array of ranks, got shape {ranks.shape}")
  if np.any(ranks < 1):
    raise ValueError("ranks are 1-based; got a rank < 1")
  out = {"mrr": float(np.mean(1.0 / ranks))}
  for k in ks:
    out[f"recall@{k}"] = float(np.mean(ranks <= k))
  out["queries"] = int(ranks.size)
  return out


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Fraction of the exact top-k neighbours the approximate search also returned."""
  approx_ids = np.asarray(approx_ids)
  exact_ids = np.asarray(exact_ids)
  if approx_ids.shape[0] != exact_ids.shape[0]:
    raise ValueError(f"query counts differ: {approx_ids.shape[0]} vs {exact_ids.shape[0]}")
  hits = total = 0
  for a, e in zip(approx_ids, exact_ids):
    e = e[e >= 0]
    hits += np.intersect1d(a[a >= 0], e).size
    total += e.size
  return hits / total if total else 1.0
