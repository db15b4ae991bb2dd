"""TF-IDF over character n-grams: the classic product-matching baseline a learned model must beat.

Titles of the same product from two shops share model numbers, brand names and word
stems even when word order and filler differ; character n-grams inside word
boundaries catch exactly that. Definitions (the common 'char_wb' ones):
- each whitespace-separated word (lower-cased) is padded with one space each side and
  cut into n-grams for n in [n_min, n_max]; a padded word no longer than n is taken
  whole, once, and longer n are not tried for it;
- tf is the n-gram count, `1 + ln(count)` with `sublinear_tf`;
- idf = ln((1 + N) / (1 + df)) + 1 over the N texts the model is fitted on;
- each vector is L2-normalised, so a score is a cosine similarity.
Pure NumPy/SciPy; scores come back as a dense [Q, G] float32 matrix, computed in query
chunks so a large gallery does not need a Q x G sparse product at once.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp


@dataclasses.dataclass(frozen=True)
class TfidfConfig:
  n_min: int = 2
  n_max: int = 5
  sublinear_tf: bool = True
  lowercase: bool = True

  def __post_init__(self):
    if not 1 <= self.n_min <= self.n_max:
      raise ValueError(f"need 1 <= n_min <= n_max, got n_min={self.n_min}, n_max={self.n_max}")


def char_ngrams(text: str, n_min: int, n_max: int, lowercase: bool = True) -> list[str]:
  """Word-bounded character n-grams of `text` (see module doc), in order of appearance."""
  if lowercase:
    text = text.lower()
  grams = []
  for word in text.split():
    padded = f" {word} "
    for n in range(n_min, n_max + 1):
      if len(padded) <= n:
        grams.append(padded)
        break
      grams.extend(padded[i:i + n] for i in range(len(padded) - n + 1))
  return grams


class CharNgramTfidf:
  """Fit the vocabulary and idf on a corpus, then map texts to L2-normalised sparse rows."""

  def __init__(self, config: TfidfConfig = TfidfConfig()):
    self.config = config
    self.vocabulary: dict[str, int] = {}
    self.idf = np.zeros(0, np.float64)

  def _counts(self, texts: Iterable[str]) -> list[collections.Counter]:
    c = self.config
    return [collections.Counter(char_ngrams(t or "", c.n_min, c.n_max, c.lowercase))
            for t in texts]

  def fit(self, texts: Sequence[str]) -> "CharNgramTfidf":
    counts = self._counts(texts)
    if not counts:
      raise ValueError("cannot fit TF-IDF on an empty corpus")
    df = collections.Counter(g for doc in counts for g in doc)
    self.vocabulary = {g: k for k, g in enumerate(sorted(df))}
    df_array = np.array([df[g] for g in sorted(df)], np.float64)
    self.idf = np.log((1.0 + len(counts)) / (1.0 + df_array)) + 1.0
    return self

  def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
    """Rows for `texts`; n-grams unseen at fit time are dropped; empty rows stay zero."""
    if not self.vocabulary:
      raise ValueError("CharNgramTfidf.transform called before fit")
    rows, cols, vals = [], [], []
    for r, doc in enumerate(self._counts(texts)):
      for g, count in doc.items():
        col = self.vocabulary.get(g)
        if col is not None:
          rows.append(r)
          cols.append(col)
          vals.append(count)
    tf = np.asarray(vals, np.float64)
    if self.config.sublinear_tf:
      tf = 1.0 + np.log(tf)
    cols_array = np.asarray(cols, np.int64)
    m = sp.csr_matrix((tf * self.idf[cols_array], (rows, cols_array)),
                      shape=(len(texts), len(self.vocabulary)))
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    return sp.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-300), 0.0)) @ m


def tfidf_scores(queries: Sequence[str], gallery: Sequence[str],
                 config: TfidfConfig = TfidfConfig(), fit_on: Sequence[str] | None = None,
                 chunk: int = 1024) -> np.ndarray:
  """Cosine similarities [Q, G] of queries vs gallery, the model fitted on `fit_on`.

  By default it is fitted on gallery + queries (unsupervised: no labels are used).
  """
  model = CharNgramTfidf(config).fit(list(fit_on) if fit_on is not None
                                     else list(gallery) + list(queries))
  g = model.transform(gallery).T.tocsr()
  q = model.transform(queries)
  out = np.empty((len(queries), len(gallery)), np.float32)
  for start in range(0, len(queries), chunk):
    out[start:start + chunk] = (q[start:start + chunk] @ g).toarray()
  return out
