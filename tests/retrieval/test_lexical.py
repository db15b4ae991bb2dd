"""The lexical scorer: same scores as the TF-IDF baseline, chunked, top-k, empty titles."""
import numpy as np
import pytest

from esspr_jax.retrieval import lexical, tfidf_baseline

GALLERY = ["Sony 16GB SD card", "HP q3675a transfer kit", "", "hewlett packard Q3675A kit",
           "kit kit kit"]
QUERIES = ["sony sd card 16 gb", "Q3675A image transfer kit", "", "zzzz"]


def test_scores_equal_tfidf_baseline_in_any_chunking():
  fit = GALLERY + QUERIES
  scorer = lexical.LexicalScorer(GALLERY, fit_on=fit)
  expected = tfidf_baseline.tfidf_scores(QUERIES, GALLERY, fit_on=fit)
  for chunk in (1, 3, 100):
    np.testing.assert_allclose(scorer.scores(QUERIES, chunk=chunk), expected, atol=1e-6)
  # Empty and unseen titles give zero rows, never NaN.
  np.testing.assert_array_equal(expected[2:], 0.0)
  np.testing.assert_array_equal(scorer.scores(QUERIES)[:, 2], 0.0)


def test_top_k_matches_a_full_sort_and_scores_at_candidates():
  scorer = lexical.LexicalScorer(GALLERY)
  full = scorer.scores(QUERIES)
  ids, scores = scorer.top_k(QUERIES, 2, chunk=2)
  for q in range(len(QUERIES)):
    order = sorted(range(len(GALLERY)), key=lambda g: (-full[q, g], g))[:2]
    assert ids[q].tolist() == order
    np.testing.assert_allclose(scores[q], full[q, order])
  rows = np.array([[3, 1, -1], [0, 4, 2]])
  got = scorer.scores_at(QUERIES[:2], rows)
  np.testing.assert_allclose(got[0, :2], full[0, [3, 1]], atol=1e-6)
  np.testing.assert_allclose(got[1], full[1, [0, 4, 2]], atol=1e-6)
  assert got[0, 2] == 0.0
  assert scorer.top_k(QUERIES, 99)[0].shape == (4, len(GALLERY))
  assert scorer.nbytes > 0


def test_all_empty_gallery_and_bad_arguments():
  scorer = lexical.LexicalScorer(["", " "])
  np.testing.assert_array_equal(scorer.scores(["anything"]), 0.0)
  with pytest.raises(ValueError, match="non-empty gallery"):
    lexical.LexicalScorer([])
  with pytest.raises(ValueError, match="k must be >= 1"):
    scorer.top_k(["a"], 0)
