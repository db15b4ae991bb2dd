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
