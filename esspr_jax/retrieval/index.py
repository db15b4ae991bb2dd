"""Nearest-neighbour search by dot product: exact (chunked, jitted) and ScaNN (tuned).

`ExactIndex` never materialises a Q x G score matrix: it scans the gallery in chunks
per query chunk, keeping a running top-k, and can also count full pessimistic ranks
for the eval table. `ScannIndex` wraps a ScaNN tree + asymmetric-hashing + exact
reorder searcher whose query-time knobs (leaves to search, reorder depth) are tuned on
a sample against exact search until recall@k reaches a target. `build_index` picks
one by gallery size; `save_index` / `load_index` round-trip either through a directory
(written to a temp dir and swapped in whole, so a reader never sees half an index or
none; a save killed mid-way leaves a temp dir the next save removes).

Both indexes return (ids int64 [Q, k], scores float32 [Q, k]); ids are row numbers of
the indexed vectors, -1 where the gallery holds fewer than k items.
"""
import dataclasses
import functools
import glob
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from esspr_jax import dir_swap
from esspr_jax.errors import DataError
from esspr_jax.retrieval import metrics

log = logging.getLogger(__name__)

INDEX_META = "index.json"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _as_matrix(vectors, what: str, dim: int | None = None) -> np.ndarray:
  v = np.asarray(vectors)
  if v.ndim != 2:
    raise DataError(f"{what}: want a [N, D] matrix, got shape {v.shape}")
  if dim is not None and v.shape[1] != dim:
    raise DataError(f"{what}: dimension {v.shape[1]} does not match the index dimension {dim}")
  if not np.all(np.isfinite(v)):
    raise DataError(f"{what}: contains NaN or inf")
  return v.astype(np.float32, copy=False)


def _scores(q, g):
  # HIGHEST: TPUs/GPUs otherwise multiply f32 in bf16 passes and break exact ties.
  return jnp.einsum("qd,gd->qg", q, g, precision=jax.lax.Precision.HIGHEST)


# Rows per block in the block-max top-k. A block's best score bounds all of its rows, so
# the k best rows of a gallery lie in its k best blocks: the scan keeps only the k best
# block maxima (a max-reduce and a top-k over `chunk / BLOCK + k` numbers per chunk,
# instead of a top-k over the whole score chunk), then rescores those k x BLOCK rows.
BLOCK = 32


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_direct(q, gallery, n_valid, k):
  """Top-k of one query chunk over the chunked gallery [C, Gc, D] (top-k per chunk)."""
  chunk = gallery.shape[1]

  def body(carry, inputs):
    best_s, best_i = carry
    g, offset = inputs
    idx = offset + jnp.arange(chunk, dtype=jnp.int32)
    s = jnp.where(idx[None, :] < n_valid, _scores(q, g), -jnp.inf)
    cat_s = jnp.concatenate([best_s, s], axis=1)
    cat_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape)], axis=1)
    top_s, pos = jax.lax.top_k(cat_s, k)
    return (top_s, jnp.take_along_axis(cat_i, pos, axis=1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32), jnp.full((q.shape[0], k), -1, jnp.int32))
  offsets = jnp.arange(gallery.shape[0], dtype=jnp.int32) * chunk
  (top_s, top_i), _ = jax.lax.scan(body, init, (gallery, offsets))
  return top_s, jnp.where(jnp.isfinite(top_s), top_i, -1)


@functools.partial(jax.jit, static_argnames=("k", "block", "sub"))
def _topk_blocks(q, gallery, n_valid, k, block, sub):
  """Top-k of one query chunk by block maxima, then an exact rescore (see BLOCK).

  Exact: the k best scores are always found; among equal scores the lower row wins,
  as in `_topk_direct`. Memory: O(Qc x (Gc + k x block)), never Q x G.
  """
  chunks, chunk, dim = gallery.shape
  blocks = chunk // block
  qn = q.shape[0]

  def body(carry, c):
    best_s, best_b = carry
    s = _scores(q, gallery[c])
    block_max = jnp.max(s.reshape(qn, blocks, block), axis=2)
    ids = c * blocks + jnp.arange(blocks, dtype=jnp.int32)
    block_max = jnp.where(ids[None, :] * block < n_valid, block_max, -jnp.inf)
    cat_s = jnp.concatenate([best_s, block_max], axis=1)
    cat_b = jnp.concatenate([best_b, jnp.broadcast_to(ids, block_max.shape)], axis=1)
    top_s, pos = jax.lax.top_k(cat_s, k)
    return (top_s, jnp.take_along_axis(cat_b, pos, axis=1)), None

  init = (jnp.full((qn, k), -jnp.inf, jnp.float32), jnp.zeros((qn, k), jnp.int32))
  (_, best_b), _ = jax.lax.scan(body, init, jnp.arange(chunks, dtype=jnp.int32))
  rows = best_b[:, :, None] * block + jnp.arange(block, dtype=jnp.int32)
  rows = jnp.sort(rows.reshape(qn, k * block), axis=1)   # ascending: ties -> lower row
  flat = gallery.reshape(chunks * chunk, dim)

  def rescore(args):
    qs, rs = args
    s = jnp.einsum("qd,qcd->qc", qs, flat[rs], precision=jax.lax.Precision.HIGHEST)
    s = jnp.where(rs < n_valid, s, -jnp.inf)
    top_s, pos = jax.lax.top_k(s, k)
    return top_s, jnp.take_along_axis(rs, pos, axis=1)

  top_s, top_i = jax.lax.map(rescore, (q.reshape(-1, sub, dim), rows.reshape(-1, sub, k * block)))
  top_s, top_i = top_s.reshape(qn, k), top_i.reshape(qn, k)
  return top_s, jnp.where(jnp.isfinite(top_s), top_i, -1)


def _topk_chunk(q, gallery, n_valid, k):
  """Block-max top-k where it saves work (k x BLOCK well below the gallery), else direct."""
  chunk = gallery.shape[1]
  if chunk % BLOCK == 0 and 4 * k * BLOCK <= gallery.shape[0] * chunk:
    return _topk_blocks(q, gallery, n_valid, k, BLOCK, math.gcd(q.shape[0], 32))
  return _topk_direct(q, gallery, n_valid, k)


@jax.jit
def _ranks_chunk(q, gallery, n_valid, target, ignore):
  """Full pessimistic ranks (see metrics.py) of one query chunk; two gallery passes.

  Both passes score with the same op, so the positive's score is bit-identical to the
  scores it is compared against and exact ties stay ties.
  """
  chunk = gallery.shape[1]
  offsets = jnp.arange(gallery.shape[0], dtype=jnp.int32) * chunk

  def positive_score(acc, inputs):
    g, offset = inputs
    idx = offset + jnp.arange(chunk, dtype=jnp.int32)
    s = _scores(q, g)
    return acc + jnp.sum(jnp.where(idx[None, :] == target[:, None], s, 0.0), axis=1), None

  pos, _ = jax.lax.scan(positive_score, jnp.zeros(q.shape[0], jnp.float32), (gallery, offsets))

  def count_above(acc, inputs):
    g, offset = inputs
    idx = offset + jnp.arange(chunk, dtype=jnp.int32)
    s = _scores(q, g)
    ignored = jnp.any(idx[None, None, :] == ignore[:, :, None], axis=1)
    competing = (idx[None, :] < n_valid) & (idx[None, :] != target[:, None]) & ~ignored
    return acc + jnp.sum(competing & (s >= pos[:, None]), axis=1, dtype=jnp.int32), None

  count, _ = jax.lax.scan(count_above, jnp.zeros(q.shape[0], jnp.int32), (gallery, offsets))
  return count


class ExactIndex:
  """Brute-force dot-product search on device, chunked over queries and gallery."""

  kind = "exact"

  def __init__(self, vectors, query_chunk: int = 1024, gallery_chunk: int = 16384):
    vectors = _as_matrix(vectors, "exact index vectors")
    self.size, self.dim = vectors.shape
    self.query_chunk = query_chunk
    gc = max(1, min(gallery_chunk, _round_up(max(self.size, 1), 8)))
    padded = np.zeros((_round_up(max(self.size, 1), gc), self.dim), np.float32)
    padded[:self.size] = vectors
    self._gallery = jnp.asarray(padded.reshape(-1, gc, self.dim))
    self._vectors = vectors

  @property
  def vectors(self) -> np.ndarray:
    return self._vectors

  def _query_chunks(self, queries):
    queries = _as_matrix(queries, "queries", self.dim)
    qc = min(self.query_chunk, _round_up(max(len(queries), 1), 8))
    for start in range(0, len(queries), qc):
      part = queries[start:start + qc]
      padded = np.zeros((qc, self.dim), np.float32)
      padded[:len(part)] = part
      yield start, len(part), padded

  def search(self, queries, k: int):
    queries = np.asarray(queries)
    ids = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    for start, n, chunk in self._query_chunks(queries):
      s, i = _topk_chunk(chunk, self._gallery, self.size, k)
      ids[start:start + n] = np.asarray(i)[:n]
      scores[start:start + n] = np.asarray(s)[:n]
    return ids, scores

  def ranks(self, queries, target, ignore=None) -> np.ndarray:
    """Full pessimistic rank of each query's positive (inf where target is ABSENT)."""
    target = np.asarray(target, np.int32)
    if np.any(target >= self.size) or np.any(target < metrics.ABSENT):
      raise DataError(f"target indices must be in [-1, {self.size})")
    if ignore is None:
      ignore = np.full((len(target), 1), metrics.ABSENT, np.int32)
    ignore = np.asarray(ignore, np.int32)
    out = np.empty(len(target), np.float64)
    for start, n, chunk in self._query_chunks(queries):
      pad = chunk.shape[0] - n
      t = np.pad(target[start:start + n], (0, pad), constant_values=metrics.ABSENT)
      ig = np.pad(ignore[start:start + n], ((0, pad), (0, 0)), constant_values=metrics.ABSENT)
      count = np.asarray(_ranks_chunk(chunk, self._gallery, self.size, t, ig))[:n]
      out[start:start + n] = 1.0 + count
    out[target == metrics.ABSENT] = np.inf
    return out


class LiveIndex:
  """A base index (ScaNN or exact) plus an exact index over rows added since, minus
  retired base rows: what an updated export searches (update.py).

  Rows 0..base.size-1 are the base's, then the delta's. Retired rows are never
  returned: the base is over-fetched until k live rows survive per query (or it is
  exhausted), then merged with the delta's top-k by score. With an exact base the
  result equals exact search over the live rows.
  """

  kind = "live"

  def __init__(self, base, delta: "ExactIndex | None", retired: np.ndarray):
    self.base, self.delta = base, delta
    self.retired = np.asarray(retired, bool)
    if len(self.retired) != base.size:
      raise DataError(f"retired-row mask has {len(self.retired)} rows, the base index {base.size}")
    self.dim = base.dim
    self.base_live = int(base.size - self.retired.sum())
    self.size = self.base_live + (delta.size if delta is not None else 0)

  def _base_search(self, queries, k):
    n_retired = self.base.size - self.base_live
    fetch = min(self.base.size, k + min(n_retired, k))
    while True:
      ids, scores = self.base.search(queries, max(fetch, 1))
      dead = (ids < 0) | self.retired[np.clip(ids, 0, None)]
      live = (~dead).sum(axis=1)
      if fetch >= self.base.size or np.all(live >= min(k, self.base_live)):
        break
      fetch = min(self.base.size, fetch * 4)
    scores = np.where(dead, -np.inf, scores)
    order = np.argsort(dead, axis=1, kind="stable")[:, :k]   # live rows first, score order kept
    return np.where(np.take_along_axis(dead, order, 1), -1, np.take_along_axis(ids, order, 1)), \
        np.take_along_axis(scores, order, 1)

  def search(self, queries, k: int):
    queries = _as_matrix(queries, "queries", self.dim)
    ids, scores = self._base_search(queries, k)
    if self.delta is not None and self.delta.size:
      d_ids, d_scores = self.delta.search(queries, min(k, self.delta.size))
      d_ids = np.where(d_ids >= 0, d_ids + self.base.size, -1)
      ids = np.concatenate([ids, d_ids], axis=1)
      scores = np.concatenate([scores, d_scores], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    if ids.shape[1] < k:
      pad = k - ids.shape[1]
      ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
      scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids.astype(np.int64), scores.astype(np.float32)


@dataclasses.dataclass
class ScannSettings:
  """What a ScaNN searcher was built and tuned with; stored in manifests."""
  num_leaves: int
  leaves_to_search: int
  reorder: int
  dims_per_block: int
  anisotropic_threshold: float
  training_sample_size: int
  target_recall: float = 0.0
  measured_recall: float = float("nan")
  tune_k: int = 20
  tune_queries: int = 0
  tuned_qps: float = float("nan")


class ScannIndex:
  """A ScaNN tree-AH-reorder searcher by dot product, with tuned query-time knobs."""

  kind = "scann"

  def __init__(self, searcher, size: int, dim: int, settings: ScannSettings):
    self.searcher = searcher
    self.size = size
    self.dim = dim
    self.settings = settings

  @classmethod
  def build(cls, vectors, scann_config, threads: int = 0) -> "ScannIndex":
    import scann  # noqa: PLC0415  (a C++ extension that only search/export need)
    vectors = _as_matrix(vectors, "ScaNN index vectors")
    n, dim = vectors.shape
    if n < 2:
      raise DataError(f"ScaNN needs at least 2 vectors, got {n}; use exact search")
    num_leaves = scann_config.num_leaves or max(1, int(round(math.sqrt(n))))
    num_leaves = min(num_leaves, max(1, n // 10))
    threshold = float(scann_config.anisotropic_threshold)
    settings = ScannSettings(
        num_leaves=num_leaves, leaves_to_search=max(1, num_leaves // 10),
        reorder=10 * scann_config.tune_k, dims_per_block=scann_config.dims_per_block,
        anisotropic_threshold=threshold,
        training_sample_size=min(n, scann_config.training_sample_size),
        target_recall=float(scann_config.target_recall), tune_k=scann_config.tune_k)
    builder = scann.scann_ops_pybind.builder(vectors, settings.tune_k, "dot_product")
    builder = builder.tree(num_leaves=num_leaves, num_leaves_to_search=settings.leaves_to_search,
                           training_sample_size=settings.training_sample_size)
    builder = builder.score_ah(settings.dims_per_block,
                               anisotropic_quantization_threshold=threshold if threshold > 0 else float("nan"))
    builder = builder.reorder(settings.reorder)
    builder.set_n_training_threads(threads or os.cpu_count() or 1)
    searcher = builder.build()
    if threads:
      searcher.set_num_threads(threads)
    return cls(searcher, n, dim, settings)

  def search(self, queries, k: int, leaves_to_search: int | None = None,
             reorder: int | None = None):
    queries = _as_matrix(queries, "queries", self.dim)
    if len(queries) == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    leaves = leaves_to_search or self.settings.leaves_to_search
    depth = max(reorder or self.settings.reorder, k)
    ids, scores = self.searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=depth, leaves_to_search=leaves)
    ids = np.asarray(ids, np.int64)
    scores = np.asarray(scores, np.float32)
    if ids.shape[1] < k:  # ScaNN returns fewer columns when the gallery is smaller than k.
      pad = k - ids.shape[1]
      ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
      scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, scores

  def tune(self, queries, exact_ids, leaves_fractions, reorder_multiples) -> ScannSettings:
    """Picks the fastest (leaves, reorder) whose recall@k vs exact reaches the target.

    For each reorder depth (ascending) finds the fewest leaves reaching the target,
    searching no further than the previous depth needed; then keeps the fastest of
    those candidates. If none reaches it, keeps the most accurate and logs a warning.
    """
    s = self.settings
    k = exact_ids.shape[1]
    ladder = sorted({max(1, min(s.num_leaves, int(math.ceil(f * s.num_leaves))))
                     for f in leaves_fractions})
    reached, best = [], None
    limit = len(ladder)
    for multiple in sorted(set(reorder_multiples)):
      reorder = multiple * k
      for j, leaves in enumerate(ladder[:limit]):
        start = time.perf_counter()
        ids, _ = self.search(queries, k, leaves, reorder)
        seconds = time.perf_counter() - start
        recall = metrics.recall_vs_exact(ids, exact_ids)
        trial = (leaves, reorder, recall, len(queries) / max(seconds, 1e-9))
        log.info("ScaNN tune: leaves=%d reorder=%d recall@%d=%.4f qps=%.0f", *trial[:2], k, *trial[2:])
        if best is None or recall > best[2]:
          best = trial
        if recall >= s.target_recall:
          reached.append(trial)
          limit = j + 1
          break
    if reached:
      chosen = max(reached, key=lambda t: t[3])
    else:
      chosen = best
      log.warning("ScaNN did not reach recall@%d >= %.3f on %d queries; best %.4f "
                  "(leaves=%d, reorder=%d)", k, s.target_recall, len(queries), best[2],
                  best[0], best[1])
    s.leaves_to_search, s.reorder, s.measured_recall, s.tuned_qps = chosen
    s.tune_queries = len(queries)
    return s


def build_index(vectors, index_config, tune_queries=None, seed: int = 0):
  """Exact index for galleries under `exact_max_gallery`, else a tuned ScaNN index.

  `tune_queries` (default: a sample of the vectors themselves) drive the tuning; the
  returned report says which kind was used, its settings and the measured recall.
  """
  vectors = _as_matrix(vectors, "index vectors")
  n = len(vectors)
  start = time.perf_counter()
  if n < max(index_config.exact_max_gallery, 2):
    index = ExactIndex(vectors, index_config.query_chunk, index_config.gallery_chunk)
    return index, {"kind": "exact", "size": n, "dim": int(vectors.shape[1]), "recall": 1.0,
                   "build_s": time.perf_counter() - start}
  cfg = index_config.scann
  index = ScannIndex.build(vectors, cfg, cfg.threads)
  build_s = time.perf_counter() - start
  rng = np.random.default_rng(seed)
  if tune_queries is None:
    tune_queries = vectors[rng.choice(n, size=min(n, cfg.tune_queries), replace=False)]
  else:
    tune_queries = _as_matrix(tune_queries, "tuning queries", vectors.shape[1])
    if len(tune_queries) > cfg.tune_queries:
      tune_queries = tune_queries[rng.choice(len(tune_queries), cfg.tune_queries, replace=False)]
  k = min(cfg.tune_k, n)
  exact = ExactIndex(vectors, index_config.query_chunk, index_config.gallery_chunk)
  exact_ids, _ = exact.search(tune_queries, k)
  del exact
  settings = index.tune(tune_queries, exact_ids, cfg.leaves_fractions, cfg.reorder_multiples)
  report = {"kind": "scann", "size": n, "dim": int(vectors.shape[1]),
            "recall": settings.measured_recall, "build_s": build_s,
            "tune_s": time.perf_counter() - start - build_s, "scann": dataclasses.asdict(settings)}
  return index, report


def save_index(index, directory) -> None:
  """Writes an index to `directory` atomically (temp dir + rename)."""
  final = pathlib.Path(directory)
  final.parent.mkdir(parents=True, exist_ok=True)
  for stale in final.parent.glob(f"{glob.escape(final.name)}.tmp-*"):
    log.warning("removing %s, left by an interrupted index save", stale)
    shutil.rmtree(stale, ignore_errors=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".tmp-"))
  try:
    meta = {"kind": index.kind, "size": index.size, "dim": index.dim}
    if isinstance(index, ScannIndex):
      # The pybind searcher itself: ScaNN's Python wrapper would also pickle doc ids.
      index.searcher.searcher.serialize(str(tmp), True)
      meta["scann"] = dataclasses.asdict(index.settings)
    else:
      np.save(tmp / "vectors.npy", index.vectors)
      meta["query_chunk"] = index.query_chunk
      meta["gallery_chunk"] = int(index._gallery.shape[1])
    (tmp / INDEX_META).write_text(json.dumps(meta, indent=2))
    dir_swap.swap_in(tmp, final)  # one atomic step; the old index then sits at tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _load_scann(directory: pathlib.Path):
  """A ScaNN searcher from its protobuf + .npy assets; never ScaNN's `load_searcher`,
  which unpickles `scann_docids.pkl` (and writes files for old layouts)."""
  from scann.scann_ops.py import scann_ops_pybind  # noqa: PLC0415  (ScaNN's C++ extension)
  assets = directory / "scann_assets.pbtxt"
  if not assets.is_file():
    raise DataError(f"{directory}: ScaNN index lacks scann_assets.pbtxt")
  text = assets.read_text()
  for path in re.findall(r'asset_path:\s*"([^"]*)"', text):
    if "/" in path or "\\" in path or path.startswith("."):
      raise DataError(f"refusing index {directory}: asset path {path!r} leaves the directory")
  searcher = scann_ops_pybind.scann_pybind.ScannNumpy(str(directory.absolute()), text)
  return scann_ops_pybind.ScannSearcher(searcher, None)


def load_index(directory):
  """Reads an index written by `save_index`; a clear DataError if it is not one."""
  directory = pathlib.Path(directory)
  meta_path = directory / INDEX_META
  if not meta_path.is_file():
    raise DataError(f"{directory} is not an index directory (no {INDEX_META})")
  meta = json.loads(meta_path.read_text())
  pickles = [p.name for p in directory.iterdir() if p.suffix.lower() in (".pkl", ".pickle")]
  if pickles:
    raise DataError(f"refusing index {directory}: it holds pickle files {pickles}")
  if meta["kind"] == "exact":
    return ExactIndex(np.load(directory / "vectors.npy", allow_pickle=False), meta["query_chunk"],
                      meta["gallery_chunk"])
  if meta["kind"] == "scann":
    return ScannIndex(_load_scann(directory), meta["size"], meta["dim"],
                      ScannSettings(**meta["scann"]))
  raise DataError(f"{meta_path}: unknown index kind {meta['kind']!r}")
