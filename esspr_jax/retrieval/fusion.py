"""Fusing dense (embedding) and lexical (TF-IDF) scores of the same query x gallery rows.

Pure NumPy functions of score rows: the last axis is the set a query is ranked over
(the whole gallery in eval, a candidate set in search); each row is fused on its own.

- weighted sum: each row is min-max normalised to [0, 1] over that set, then
  `w * dense + (1 - w) * lexical`. Min-max (not z-score) because the two scorers live
  on different scales and spreads (cosines of unit embeddings bunch near their top;
  TF-IDF cosines are mostly 0 with a few large values): after min-max both put their
  best item at 1 and their worst at 0, so `w` reads as "how much of the ranking comes
  from the dense side", and a z-score of a mostly-zero TF-IDF row would blow its few
  hits up by the inverse of a tiny std. A constant row (an empty title: all lexical
  scores 0) normalises to zeros, so it leaves the other scorer's ranking alone.
- reciprocal-rank fusion: `1 / (k + rank_dense) + 1 / (k + rank_lexical)`, ranks
  1-based within the row, tied scores sharing the best rank of their group (so a
  constant row adds the same to every item and changes nothing).
- `choose_weight` picks `w` from a grid on a validation task: highest Recall@1, then
  highest MRR, then the earlier grid entry. It must be given a validation task, never
  the evaluated one (the recipe carves one from the training side).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from esspr_jax.config.eval import HYBRID_METHODS as METHODS
from esspr_jax.retrieval import metrics


def _rows(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"want [queries, items] scores, got shape {x.shape}")
  return x


def minmax_rows(scores) -> np.ndarray:
  """Each row mapped to [0, 1] by its own min and max; constant rows become 0."""
  x = _rows(scores)
  if x.shape[1] == 0:
    return x
  low = x.min(axis=1, keepdims=True)
  span = x.max(axis=1, keepdims=True) - low
  return np.where(span > 0, (x - low) / np.where(span > 0, span, 1.0), 0.0)


def weighted_sum(dense, lexical, weight: float) -> np.ndarray:
  """w * minmax(dense) + (1 - w) * minmax(lexical), row by row (float64)."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
  d, lex = _rows(dense), _rows(lexical)
  if d.shape != lex.shape:
    raise ValueError(f"dense scores {d.shape} and lexical scores {lex.shape} differ in shape")
  return weight * minmax_rows(d) + (1.0 - weight) * minmax_rows(lex)


def competition_ranks(scores) -> np.ndarray:
  """1 + the number of items in the row scoring strictly higher (ties share a rank)."""
  x = _rows(scores)
  out = np.empty(x.shape, np.float64)
  for i, row in enumerate(x):
    ordered = np.sort(-row)
    out[i] = 1 + np.searchsorted(ordered, -row, side="left")
  return out


def reciprocal_rank_fusion(dense, lexical, k: float = 60.0) -> np.ndarray:
  """sum over the two scorers of 1 / (k + rank), row by row (float64)."""
  if not k > 0:
    raise ValueError(f"rrf k must be > 0, got {k}")
  d, lex = _rows(dense), _rows(lexical)
  if d.shape != lex.shape:
    raise ValueError(f"dense scores {d.shape} and lexical scores {lex.shape} differ in shape")
  return 1.0 / (k + competition_ranks(d)) + 1.0 / (k + competition_ranks(lex))


def fuse(method: str, dense, lexical, *, weight: float = 0.5, rrf_k: float = 60.0) -> np.ndarray:
  """One entry point for both methods (`weight` is the weighted sum's, `rrf_k` RRF's)."""
  if method == "weighted":
    return weighted_sum(dense, lexical, weight)
  if method == "rrf":
    return reciprocal_rank_fusion(dense, lexical, rrf_k)
  raise ValueError(f"unknown fusion method {method!r}; use one of {METHODS}")


def fused_metrics(method: str, dense, lexical, target, ignore=None, *, weight: float = 0.5,
                  rrf_k: float = 60.0, ks: Sequence[int] = (1, 5, 10, 20)) -> dict:
  """MRR / Recall@K of the fused scores (pessimistic ties, metrics.py)."""
  fused = fuse(method, dense, lexical, weight=weight, rrf_k=rrf_k)
  return metrics.retrieval_metrics(metrics.pessimistic_ranks(fused, target, ignore), ks)


def choose_weight(dense, lexical, target, ignore=None, weights: Sequence[float] = (0.5,),
                  ks: Sequence[int] = (1, 5, 10, 20)) -> tuple[float, list[dict]]:
  """(best w, [{'weight': w, **metrics} per grid entry]) by R@1, then MRR, then grid order."""
  weights = [float(w) for w in weights]
  if not weights:
    raise ValueError("choose_weight needs a non-empty grid of weights")
  if 1 not in ks:
    ks = (1,) + tuple(k for k in ks if k != 1)
  table = [dict(weight=w, **fused_metrics("weighted", dense, lexical, target, ignore,
                                          weight=w, ks=ks)) for w in weights]
  best = max(range(len(table)),
             key=lambda i: (table[i]["recall@1"], table[i]["mrr"], -i))
  return weights[best], table
