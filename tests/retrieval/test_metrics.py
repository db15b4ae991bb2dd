"""Metrics against hand-computed cases: pessimistic ties, absent positives, ignored items."""
import math

import numpy as np
import pytest

from esspr_jax.retrieval import metrics

SCORES = np.array([
    [0.9, 0.5, 0.9, 0.1],   # positive 0 ties with item 2 -> pessimistic rank 2
    [0.2, 0.8, 0.3, 0.4],   # positive 1 is strictly best -> rank 1
    [0.5, 0.5, 0.5, 0.5],   # everything ties -> rank 4 (gallery size), not 1
    [0.3, 0.2, 0.1, 0.0],   # positive absent from the gallery -> rank inf
])
TARGET = np.array([0, 1, 3, metrics.ABSENT])


def test_pessimistic_ranks_hand_computed():
  ranks = metrics.pessimistic_ranks(SCORES, TARGET)
  np.testing.assert_array_equal(ranks, [2, 1, 4, np.inf])


def test_metrics_hand_computed():
  m = metrics.retrieval_metrics([2, 1, 4, np.inf], ks=(1, 2, 5))
  assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 4 + 0) / 4)
  assert m["recall@1"] == pytest.approx(1 / 4)
  assert m["recall@2"] == pytest.approx(2 / 4)
  assert m["recall@5"] == pytest.approx(3 / 4)  # the absent positive stays in the denominator
  assert m["queries"] == 4


def test_ignored_items_do_not_compete():
  ignore = np.array([[2, -1], [-1, -1], [0, 1], [-1, -1]])
  ranks = metrics.pessimistic_ranks(SCORES, TARGET, ignore)
  np.testing.assert_array_equal(ranks, [1, 1, 2, np.inf])


def test_ranks_from_topk_matches_dense_when_list_is_deep_enough():
  order = np.argsort(-SCORES, axis=1, kind="stable")
  topk_scores = np.take_along_axis(SCORES, order, axis=1)
  ranks = metrics.ranks_from_topk(order, topk_scores, TARGET)
  np.testing.assert_array_equal(ranks, metrics.pessimistic_ranks(SCORES, TARGET))


def test_ranks_from_topk_truncation_padding_and_ignore():
  ids = np.array([[5, 3, -1], [7, 8, 9], [4, 2, 1]])
  scores = np.array([[0.9, 0.7, -np.inf], [0.9, 0.8, 0.8], [0.9, 0.9, 0.1]])
  target = np.array([3, 1, 2])           # found at 2; not returned; tied with item 4
  ranks = metrics.ranks_from_topk(ids, scores, target)
  np.testing.assert_array_equal(ranks, [2, np.inf, 2])
  ranks = metrics.ranks_from_topk(ids, scores, target, ignore=np.array([[5], [-1], [4]]))
  np.testing.assert_array_equal(ranks, [1, np.inf, 1])


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="1-based"):
    metrics.retrieval_metrics([0, 1])
  with pytest.raises(ValueError, match="non-empty"):
    metrics.retrieval_metrics([])
  with pytest.raises(ValueError, match="target"):
    metrics.pessimistic_ranks(SCORES, np.array([0, 1, 2, 4]))


def test_recall_vs_exact():
  exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  approx = np.array([[4, 3, 9, 1], [5, 6, 7, 8]])
  assert metrics.recall_vs_exact(approx, exact) == pytest.approx(7 / 8)
  assert math.isclose(metrics.recall_vs_exact(exact, exact), 1.0)
