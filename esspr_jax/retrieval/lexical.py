"""A lexical title scorer over one gallery: sparse char n-gram TF-IDF, queries in chunks.

The dense model misses what TF-IDF is good at (exact model numbers, rare brand
strings); fusion.py adds the two. This object holds what a gallery costs: the
L2-normalised sparse [G, V] TF-IDF matrix (nnz ~ the gallery's n-gram count) and the
vocabulary. Queries are scored `chunk` rows at a time, so a caller that asks for scores
gets them chunk by chunk ([chunk, G] float32 each) and one that asks for top-k never
holds a Q x G matrix. The TF-IDF definition is tfidf_baseline.py's, unchanged.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from esspr_jax.retrieval import tfidf_baseline


class LexicalScorer:
  """TF-IDF cosine of query titles against the gallery titles it was fitted on."""

  def __init__(self, gallery_titles: Sequence[str], *, fit_on: Sequence[str] | None = None,
               config: tfidf_baseline.TfidfConfig = tfidf_baseline.TfidfConfig()):
    """`fit_on`: texts for the vocabulary and idf (default: the gallery titles alone)."""
    gallery_titles = ["" if t is None else str(t) for t in gallery_titles]
    if not gallery_titles:
      raise ValueError("LexicalScorer needs a non-empty gallery")
    corpus = list(fit_on) if fit_on is not None else gallery_titles
    if not any(tfidf_baseline.char_ngrams(t or "", config.n_min, config.n_max, config.lowercase)
               for t in corpus):
      # An all-empty corpus has no vocabulary: every score is 0 (not an error, not NaN).
      corpus = corpus + ["\u0000"]
    self.model = tfidf_baseline.CharNgramTfidf(config).fit(corpus)
    self.gallery_t = self.model.transform(gallery_titles).T.tocsr()   # [V, G]
    self.size = len(gallery_titles)

  @property
  def nbytes(self) -> int:
    """Bytes of the sparse gallery matrix (what the scorer keeps besides the vocabulary)."""
    m = self.gallery_t
    return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

  def query_rows(self, queries: Sequence[str]) -> sp.csr_matrix:
    return self.model.transform(["" if q is None else str(q) for q in queries])

  def score_chunks(self, queries: Sequence[str], chunk: int = 1024
                   ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 [n, G]) for consecutive query chunks; an empty title's row is 0."""
    if chunk < 1:
      raise ValueError(f"chunk must be >= 1, got {chunk}")
    for start in range(0, len(queries), chunk):
      q = self.query_rows(queries[start:start + chunk])
      yield start, np.asarray((q @ self.gallery_t).toarray(), np.float32)

  def scores(self, queries: Sequence[str], chunk: int = 1024) -> np.ndarray:
    """All [Q, G] scores (for small galleries; large ones should use score_chunks/top_k)."""
    out = np.zeros((len(queries), self.size), np.float32)
    for start, block in self.score_chunks(queries, chunk):
      out[start:start + len(block)] = block
    return out

  def scores_at(self, queries: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """Scores [Q, C] of each query against its own candidate gallery rows `rows[q]`."""
    rows = np.asarray(rows, np.int64)
    q = self.query_rows(queries)
    out = np.zeros(rows.shape, np.float32)
    for i in range(rows.shape[0]):
      valid = rows[i] >= 0
      if valid.any():
        out[i, valid] = (q[i] @ self.gallery_t[:, rows[i][valid]]).toarray().ravel()
    return out

  def top_k(self, queries: Sequence[str], k: int, chunk: int = 1024
            ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [Q, k], scores float32 [Q, k]), best first; ties by lower gallery row."""
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, self.size)
    ids = np.zeros((len(queries), k), np.int64)
    scores = np.zeros((len(queries), k), np.float32)
    for start, block in self.score_chunks(queries, chunk):
      order = np.argsort(-block, axis=1, kind="stable")[:, :k]
      ids[start:start + len(block)] = order
      scores[start:start + len(block)] = np.take_along_axis(block, order, axis=1)
    return ids, scores
