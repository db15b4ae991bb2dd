"""mine_nearest against a brute-force loop over every (query, listing)."""
import numpy as np
import pytest

from esspr_jax.hard_negatives.mine import mine_nearest


def brute_force(queries, listings, qcat, lcat, excluded, n):
  rows, scores = [], []
  for q in range(len(queries)):
    cands = [(-float(np.dot(queries[q].astype(np.float64), listings[j])), j)
             for j in range(len(listings)) if lcat[j] == qcat[q] and j not in set(excluded[q])]
    cands.sort()
    best = cands[:n]
    rows.append([j for _, j in best] + [-1] * (n - len(best)))
    scores.append([-s for s, _ in best] + [-np.inf] * (n - len(best)))
  return np.array(rows), np.array(scores)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_equals_brute_force(chunk_size):
  rng = np.random.RandomState(0)
  listings = rng.randn(40, 5).astype(np.float32)
  lcat = rng.randint(0, 4, size=40)
  lcat[39] = 9  # a category with a single listing: fewer than n candidates
  trig = rng.choice(40, size=25, replace=False)
  trig[0] = 39
  queries, qcat = listings[trig], lcat[trig]
  excluded = [np.concatenate([[t], rng.choice(40, size=3)]) for t in trig]
  want_rows, want_scores = brute_force(queries, listings, qcat, lcat, excluded, 3)
  rows, scores = mine_nearest(queries, listings, qcat, lcat, excluded, 3,
                              chunk_size=chunk_size)
  np.testing.assert_array_equal(rows, want_rows)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  assert (rows[0] == -1).all()  # its only same-category listing is itself
  for q, t in enumerate(trig):
    taken = rows[q][rows[q] >= 0]
    assert (lcat[taken] == qcat[q]).all() and not set(taken) & set(excluded[q])


def test_ties_go_to_the_lower_row():
  listings = np.ones((5, 2), np.float32)
  rows, _ = mine_nearest(listings[:1], listings, np.zeros(1), np.zeros(5), [np.array([0])], 2)
  np.testing.assert_array_equal(rows, [[1, 2]])


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="one E"):
    mine_nearest(np.zeros((2, 3)), np.zeros((4, 2)), np.zeros(2), np.zeros(4), [[]] * 2, 1)
  with pytest.raises(ValueError, match="exclusion lists"):
    mine_nearest(np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(2), np.zeros(4), [[]], 1)


def _index_config(exact_max_gallery):
  from esspr_jax.config import compose  # noqa: PLC0415
  config = compose("tiny").eval.index
  config.exact_max_gallery = exact_max_gallery
  config.scann.tune_queries = 200
  config.scann.threads = 1
  return config


def test_large_categories_go_through_scann_and_keep_the_rules(caplog):
  """Two categories of 1,500 listings (over exact_max_gallery=1,000: ScaNN, tuned to
  recall 0.99) and one of 40 (exact): the same-category and exclusion rules hold on
  every row, the exact category equals mine_nearest's exact answer, and the ScaNN
  rows find nearly all of the exact top-3. Trigger 0 excludes its 60 nearest: the
  search asks for n + 60, so it still gets the exact next 3."""
  rng = np.random.RandomState(1)
  centres = rng.randn(30, 16)
  listings = (centres[rng.randint(0, 30, 3040)] + 0.5 * rng.randn(3040, 16)).astype(np.float32)
  listings /= np.linalg.norm(listings, axis=1, keepdims=True)
  lcat = np.repeat([0, 1, 2], [1500, 1500, 40])
  trig = np.concatenate([rng.choice(1500, 150, replace=False),
                         1500 + rng.choice(1500, 150, replace=False), 3000 + np.arange(20)])
  queries, qcat = listings[trig], lcat[trig]
  excluded = [np.array([t]) for t in trig]
  nearest0 = np.argsort(-(listings[:1500] @ queries[0]), kind="stable")
  excluded[0] = nearest0[:60]
  exact_rows, exact_scores = mine_nearest(queries, listings, qcat, lcat, excluded, 3)
  with caplog.at_level("INFO", logger="esspr_jax.hard_negatives.mine"):
    rows, scores = mine_nearest(queries, listings, qcat, lcat, excluded, 3,
                                index_config=_index_config(1000))
  said = [r.getMessage() for r in caplog.records if "via" in r.getMessage()]
  assert len(said) == 2 and all("1500 listings via scann" in m for m in said), said
  assert (rows >= 0).all()
  for q in range(len(trig)):
    assert (lcat[rows[q]] == qcat[q]).all() and not set(rows[q]) & set(excluded[q])
    np.testing.assert_allclose(scores[q], listings[rows[q]] @ queries[q], rtol=1e-4, atol=1e-5)
  small = qcat == 2
  np.testing.assert_array_equal(rows[small], exact_rows[small])
  np.testing.assert_array_equal(rows[0], exact_rows[0])
  large = ~small
  overlap = np.mean([len(set(rows[q]) & set(exact_rows[q])) / 3
                     for q in np.flatnonzero(large)])
  assert overlap >= 0.95, overlap


def test_triggers_an_index_leaves_short_are_scored_exactly(monkeypatch, caplog):
  """An index that returns one candidate where n=3 are needed (ScaNN can come back
  short when its searched partitions hold too few rows): those triggers fall back to
  the exact search, so the table equals the exact one and the log counts them."""
  from esspr_jax.retrieval import index as index_lib  # noqa: PLC0415

  class OneCandidate:
    def __init__(self, inner):
      self.inner = inner

    def search(self, queries, k):
      ids, scores = self.inner.search(queries, k)
      ids, scores = np.array(ids), np.array(scores)
      ids[1::2, 1:] = -1   # every other trigger: only its first candidate
      return ids, scores

  monkeypatch.setattr(index_lib, "build_index", lambda vectors, config, tune_queries=None:
                      (OneCandidate(index_lib.ExactIndex(vectors)), {"kind": "short", "recall": 1.0}))
  rng = np.random.RandomState(2)
  listings = rng.randn(60, 8).astype(np.float32)
  trig = np.arange(0, 60, 3)
  excluded = [np.array([t]) for t in trig]
  cats = np.zeros(60, int)
  want = mine_nearest(listings[trig], listings, cats[trig], cats, excluded, 3)
  with caplog.at_level("INFO", logger="esspr_jax.hard_negatives.mine"):
    got = mine_nearest(listings[trig], listings, cats[trig], cats, excluded, 3,
                       index_config=_index_config(50))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
  said = [r.getMessage() for r in caplog.records if "via short" in r.getMessage()]
  assert len(said) == 1 and f"{len(trig) // 2} scored exactly" in said[0], said
