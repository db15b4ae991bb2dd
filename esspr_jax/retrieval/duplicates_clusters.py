"""Duplicate clusters of a catalog: listings joined by a score >= threshold, transitively.

    edges(vectors, threshold, top_k, *, groups=None, index_config=None) -> Edges
    clusters(n, edges) -> [Cluster]          union-find over the edges, size >= 2 only
    cluster_catalog(vectors, threshold, top_k, *, groups=None, ...) -> [Cluster]

Memory is bounded by neighbour lists, never an N x N matrix: each listing keeps its
`top_k` nearest other listings, and only those scored >= threshold become edges. With
`groups` (a supplier id per row: scope 'supplier') only listings of the same group are
compared, group by group, exactly (a [chunk, group size] block at a time); without it
(scope 'all') the whole catalog is searched through the retrieval index (index.py:
exact below `eval.index.exact_max_gallery`, tuned ScaNN above). The clusters equal the
all-pairs ones whenever no listing has more than `top_k` partners above the threshold;
past that, a cluster can only split, never merge wrongly (edges are a subset).
"""
import dataclasses

import numpy as np

from esspr_jax.errors import DataError
from esspr_jax.retrieval import index as index_lib

# Query rows per block in the per-group exact search: [BLOCK, group size] scores at a time.
BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class Edges:
  """Undirected pairs a < b with their score, each pair once."""
  a: np.ndarray       # int64 [M]
  b: np.ndarray       # int64 [M]
  score: np.ndarray   # float32 [M]


@dataclasses.dataclass(frozen=True)
class Cluster:
  rows: np.ndarray    # int64, ascending
  edges: int          # edges inside the cluster (>= size - 1)
  min_score: float    # its weakest edge: the cluster holds at any threshold up to this
  max_score: float


def _check_vectors(vectors) -> np.ndarray:
  v = np.asarray(vectors, np.float32)
  if v.ndim != 2:
    raise DataError(f"duplicate clustering: want embeddings [N, D], got shape {v.shape}")
  bad = np.flatnonzero(~np.isfinite(v).all(axis=1))
  if len(bad):
    raise DataError(f"duplicate clustering: {len(bad)} embeddings hold NaN or inf (first at "
                    f"row {int(bad[0])})")
  return v


def _keep(rows_a, rows_b, scores, threshold) -> tuple:
  ok = (rows_b >= 0) & (rows_a != rows_b) & (scores >= threshold)
  a, b = rows_a[ok], rows_b[ok]
  return np.minimum(a, b), np.maximum(a, b), scores[ok]


def _dedupe(parts: list, n: int) -> Edges:
  """Each pair once (found from both ends: the larger score, as ScaNN may differ)."""
  a = np.concatenate([np.zeros(0)] + [p[0] for p in parts]).astype(np.int64)
  b = np.concatenate([np.zeros(0)] + [p[1] for p in parts]).astype(np.int64)
  s = np.concatenate([np.zeros(0)] + [p[2] for p in parts]).astype(np.float32)
  if not len(a):
    return Edges(a, b, s)
  key = a * n + b
  order = np.lexsort((-s, key))
  first = np.append(True, key[order][1:] != key[order][:-1])
  keep = order[first]
  return Edges(a[keep], b[keep], s[keep])


def _group_edges(v: np.ndarray, rows: np.ndarray, threshold: float, top_k: int) -> tuple:
  """Exact top_k neighbours within one group, a block of queries at a time."""
  g = v[rows]
  k = min(top_k + 1, len(rows))   # + 1: a listing is its own nearest neighbour
  out_a, out_b, out_s = [], [], []
  for start in range(0, len(rows), BLOCK):
    s = g[start:start + BLOCK] @ g.T
    local = np.arange(start, start + len(s))
    s[np.arange(len(s)), local] = -np.inf
    top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < len(rows) else \
        np.broadcast_to(np.arange(len(rows)), s.shape)
    scores = np.take_along_axis(s, top, axis=1)
    qa = np.broadcast_to(local[:, None], top.shape)
    a, b, sc = _keep(rows[qa.ravel()], rows[top.ravel()], scores.ravel(), threshold)
    out_a.append(a), out_b.append(b), out_s.append(sc)
  return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)


def edges(vectors, threshold: float, top_k: int, *, groups=None, index_config=None,
          index=None) -> Edges:
  """Pairs scored >= threshold among each listing's top_k neighbours (see module doc).

  `index`: a ready index over `vectors` (scope 'all'); else one is built from
  `index_config` (exact when None)."""
  if not np.isfinite(threshold):
    raise DataError(f"duplicate threshold must be a finite number, got {threshold!r}")
  if top_k < 1:
    raise DataError(f"duplicate clustering needs top_k >= 1, got {top_k}")
  v = _check_vectors(vectors)
  n = len(v)
  parts = []
  if groups is not None:
    groups = np.asarray(groups)
    if groups.shape != (n,):
      raise DataError(f"duplicate clustering: {groups.shape} group labels for {n} embeddings")
    _, inverse = np.unique(groups, return_inverse=True)
    for rows in np.split(np.argsort(inverse, kind="stable"),
                         np.cumsum(np.bincount(inverse))[:-1]):
      if len(rows) > 1:
        parts.append(_group_edges(v, rows, threshold, top_k))
    return _dedupe(parts, n)
  if n < 2:
    return _dedupe(parts, n)
  if index is None:
    index = (index_lib.build_index(v, index_config)[0] if index_config is not None
             else index_lib.ExactIndex(v))
  k = min(top_k + 1, n)
  for start in range(0, n, 65536):
    ids, scores = index.search(v[start:start + 65536], k)
    qa = np.broadcast_to(np.arange(start, start + len(ids))[:, None], ids.shape)
    parts.append(_keep(qa.ravel(), np.asarray(ids, np.int64).ravel(),
                       np.asarray(scores, np.float32).ravel(), threshold))
  return _dedupe(parts, n)


def _find(parent: list, x: int) -> int:
  while parent[x] != x:
    parent[x] = parent[parent[x]]   # path halving
    x = parent[x]
  return x


def _by_key(keys: np.ndarray, values: np.ndarray) -> dict:
  """{key: its values, in input order} by one stable sort (no per-key scans)."""
  order = np.argsort(keys, kind="stable")
  uniq, starts = np.unique(keys[order], return_index=True)
  return dict(zip(uniq.tolist(), np.split(values[order], starts[1:])))


def clusters(n: int, e: Edges) -> list[Cluster]:
  """Connected components of the edges (union-find), size >= 2, largest first (then by
  their first row)."""
  parent = list(range(n))   # a list: scalar reads of an array are far slower
  for a, b in zip(e.a.tolist(), e.b.tolist()):
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  roots = np.array([_find(parent, x) for x in range(n)], np.int64)
  members = _by_key(roots, np.arange(n))
  edge_scores = _by_key(roots[e.a], e.score)
  out = [Cluster(rows, len(edge_scores[r]), float(edge_scores[r].min()),
                 float(edge_scores[r].max()))
         for r, rows in members.items() if len(rows) >= 2]
  out.sort(key=lambda c: (-len(c.rows), int(c.rows[0])))
  return out


def cluster_catalog(vectors, threshold: float, top_k: int, *, groups=None,
                    index_config=None, index=None) -> list[Cluster]:
  e = edges(vectors, threshold, top_k, groups=groups, index_config=index_config, index=index)
  return clusters(len(np.asarray(vectors)), e)
