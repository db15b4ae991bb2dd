"""Score fusion against hand-computed examples and a brute-force float64 reference."""
import numpy as np
import pytest

from esspr_jax.retrieval import fusion, metrics


def _brute_minmax(row):
  lo, hi = min(row), max(row)
  return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in row]


def _brute_ranks(row):
  return [1 + sum(1 for u in row if u > v) for v in row]


def test_minmax_and_weighted_sum_by_hand():
  dense = np.array([[0.2, 0.6, 1.0]])
  lexical = np.array([[0.0, 0.5, 0.25]])
  np.testing.assert_allclose(fusion.minmax_rows(dense), [[0.0, 0.5, 1.0]])
  np.testing.assert_allclose(fusion.minmax_rows(lexical), [[0.0, 1.0, 0.5]])
  # w = 0.25: 0.25 * [0, .5, 1] + 0.75 * [0, 1, .5] = [0, .875, .625]
  np.testing.assert_allclose(fusion.weighted_sum(dense, lexical, 0.25), [[0.0, 0.875, 0.625]])
  np.testing.assert_allclose(fusion.weighted_sum(dense, lexical, 1.0), [[0.0, 0.5, 1.0]])


def test_empty_title_gives_zero_lexical_row_and_keeps_the_dense_order():
  dense = np.array([[0.3, 0.9, 0.1], [0.5, 0.5, 0.5]])
  lexical = np.zeros((2, 3))        # e.g. an empty query title
  fused = fusion.weighted_sum(dense, lexical, 0.4)
  assert np.isfinite(fused).all()
  np.testing.assert_allclose(fused[0], 0.4 * np.array([0.2 / 0.8, 1.0, 0.0]))
  np.testing.assert_array_equal(fused[1], 0.0)
  rrf = fusion.reciprocal_rank_fusion(dense, lexical, 60)
  assert np.argsort(-rrf[0]).tolist() == [1, 0, 2]
  np.testing.assert_allclose(rrf[1], 2 / 61)


def test_rrf_by_hand_with_ties():
  dense = np.array([[0.9, 0.5, 0.5, 0.1]])
  lexical = np.array([[0.0, 0.8, 0.0, 0.3]])
  # dense ranks 1, 2, 2, 4 (tied items share the best rank); lexical 3, 1, 3, 2
  np.testing.assert_array_equal(fusion.competition_ranks(dense), [[1, 2, 2, 4]])
  expected = [1 / 11 + 1 / 13, 1 / 12 + 1 / 11, 1 / 12 + 1 / 13, 1 / 14 + 1 / 12]
  np.testing.assert_allclose(fusion.reciprocal_rank_fusion(dense, lexical, 10), [expected])


def test_against_brute_force_reference():
  rng = np.random.default_rng(3)
  dense = rng.normal(size=(7, 11)).round(1)     # rounding makes ties
  lexical = np.maximum(rng.normal(size=(7, 11)), 0).round(1)
  lexical[2] = 0
  w, k = 0.7, 60
  for q in range(7):
    d, lex = _brute_minmax(list(dense[q])), _brute_minmax(list(lexical[q]))
    np.testing.assert_allclose(fusion.weighted_sum(dense, lexical, w)[q],
                               [w * a + (1 - w) * b for a, b in zip(d, lex)], rtol=1e-12)
    rd, rl = _brute_ranks(list(dense[q])), _brute_ranks(list(lexical[q]))
    np.testing.assert_allclose(fusion.reciprocal_rank_fusion(dense, lexical, k)[q],
                               [1 / (k + a) + 1 / (k + b) for a, b in zip(rd, rl)], rtol=1e-12)


def test_choose_weight_by_r1_then_mrr_then_grid_order():
  # Query 0's positive is item 0 (dense ranks it 2nd, lexical 1st); query 1's is item 1
  # (dense 1st, lexical 3rd). Rows are already min-max normalised.
  dense = np.array([[0.8, 1.0, 0.0], [0.0, 1.0, 0.6]])
  lexical = np.array([[1.0, 0.0, 0.2], [0.5, 0.0, 1.0]])
  target = np.array([0, 1])
  # By hand: w=0 ranks (1, 3); w=.5: q1 .5 vs item2 .3+.5=.8 -> (1, 2); w=.6 -> (1, 2);
  # w=.8: q0 .64+.2=.84 vs .8, q1 .8 vs .48+.2=.68 -> (1, 1); w=1 -> (2, 1).
  best, table = fusion.choose_weight(dense, lexical, target, None,
                                     weights=(0.0, 0.5, 0.6, 0.8, 1.0))
  by_w = {row["weight"]: row for row in table}
  assert [by_w[w]["recall@1"] for w in (0.0, 0.5, 0.6, 0.8, 1.0)] == [0.5, 0.5, 0.5, 1.0, 0.5]
  assert by_w[0.0]["mrr"] == pytest.approx(2 / 3) and by_w[0.5]["mrr"] == pytest.approx(0.75)
  assert best == 0.8
  # Without 0.8: R@1 ties everywhere; MRR prefers 0.5 and 0.6 over 0; grid order picks 0.5.
  assert fusion.choose_weight(dense, lexical, target, None, weights=(0.0, 0.6, 0.5))[0] == 0.6
  assert fusion.choose_weight(dense, lexical, target, None, weights=(0.0, 0.5, 0.6))[0] == 0.5
  ranks = metrics.pessimistic_ranks(fusion.weighted_sum(dense, lexical, 0.5), target)
  assert ranks.tolist() == [1.0, 2.0]


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="weight must be in"):
    fusion.weighted_sum(np.zeros((1, 2)), np.zeros((1, 2)), 1.5)
  with pytest.raises(ValueError, match="differ in shape"):
    fusion.reciprocal_rank_fusion(np.zeros((1, 2)), np.zeros((1, 3)))
  with pytest.raises(ValueError, match="unknown fusion method"):
    fusion.fuse("max", np.zeros((1, 2)), np.zeros((1, 2)))
  with pytest.raises(ValueError, match="non-empty grid"):
    fusion.choose_weight(np.zeros((1, 2)), np.zeros((1, 2)), np.array([0]), weights=())
