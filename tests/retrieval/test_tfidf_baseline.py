"""TF-IDF char n-gram baseline against a dict-based reference written here (and scikit-learn)."""
import math

import numpy as np
import pytest

from esspr_jax.retrieval import tfidf_baseline as tb

CORPUS = ["Sony 16GB SD card", "sony sd card 16 gb class 4", "HP q3675a transfer kit",
          "hewlett packard Q3675A image transfer kit", "a", "", "kit kit kit"]


def test_char_ngrams_by_hand():
  assert tb.char_ngrams("Ab", 2, 3) == [" a", "ab", "b ", " ab", "ab "]
  # A padded word no longer than n is taken once, whole, and longer n are skipped.
  assert tb.char_ngrams("x", 2, 5) == [" x", "x ", " x "]
  assert tb.char_ngrams("x Y", 3, 4) == [" x ", " y "]
  assert tb.char_ngrams("  ", 2, 4) == []


def _reference_vectors(texts, fit, n_min, n_max):
  """Straight from the definitions, with dicts: sublinear tf * smooth idf, L2-normalised."""
  docs = [tb.char_ngrams(t, n_min, n_max) for t in fit]
  df = {}
  for d in docs:
    for g in set(d):
      df[g] = df.get(g, 0) + 1
  idf = {g: math.log((1 + len(docs)) / (1 + c)) + 1 for g, c in df.items()}
  out = []
  for t in texts:
    grams = tb.char_ngrams(t, n_min, n_max)
    w = {g: (1 + math.log(grams.count(g))) * idf[g] for g in set(grams) if g in idf}
    norm = math.sqrt(sum(v * v for v in w.values()))
    out.append({g: v / norm for g, v in w.items()} if norm else {})
  return out


def test_scores_match_dict_reference():
  queries, gallery = CORPUS[:4] + ["ÿÿÿ", ""], CORPUS
  ours = tb.tfidf_scores(queries, gallery, tb.TfidfConfig(2, 4), fit_on=CORPUS, chunk=3)
  q_ref = _reference_vectors(queries, CORPUS, 2, 4)
  g_ref = _reference_vectors(gallery, CORPUS, 2, 4)
  ref = np.array([[sum(v * g.get(k, 0.0) for k, v in q.items()) for g in g_ref] for q in q_ref])
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  assert ours[0, 1] > ours[0, 2]  # the two Sony cards are nearer than Sony vs HP
  assert np.all(ours[-2:] == 0)   # no known n-gram / empty: zero row, not NaN


def test_scores_match_scikit_learn():
  text = pytest.importorskip("sklearn.feature_extraction.text",
                             reason="scikit-learn absent: cross-check skipped")
  vec = text.TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
  g = vec.fit_transform(CORPUS)
  ref = (g @ g.T).toarray()
  ours = tb.tfidf_scores(CORPUS, CORPUS, tb.TfidfConfig(2, 5), fit_on=CORPUS)
  np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_bad_config_and_unfitted_use_raise():
  with pytest.raises(ValueError, match="n_min"):
    tb.TfidfConfig(3, 2)
  with pytest.raises(ValueError, match="before fit"):
    tb.CharNgramTfidf().transform(["x"])
  with pytest.raises(ValueError, match="empty corpus"):
    tb.CharNgramTfidf().fit([])
