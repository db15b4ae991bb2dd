"""The per-setting table through exact search and through ScaNN agree; errors are named."""
import numpy as np
import pytest

from esspr_jax.config import eval as eval_config
from esspr_jax.errors import DataError
from esspr_jax.retrieval import metrics, scoring


def unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def pairs():
  rng = np.random.default_rng(0)
  n, dim = 1500, 16
  style = unit(rng.normal(size=(n, dim)))
  trigger = {m: unit(style + 0.6 * unit(rng.normal(size=(n, dim)))) for m in "tm"}
  recall = {m: unit(style + 0.6 * unit(rng.normal(size=(n, dim)))) for m in "tm"}
  layout = scoring.layout_pairs([f"q{i}" for i in range(n)], [f"g{i}" for i in range(n)])
  return trigger, recall, layout


def test_exact_table_matches_dense_reference(pairs):
  trigger, recall, layout = pairs
  config = eval_config.default_config("tiny")
  (result,) = scoring.score_settings(trigger, recall, layout, ["t-m"], config)
  dense = trigger["t"] @ recall["m"].T
  expected = metrics.retrieval_metrics(metrics.pessimistic_ranks(dense, layout.target), config.ks)
  assert result.metrics == pytest.approx(expected)
  assert result.retrieval["kind"] == "exact"
  assert 0.2 < result.metrics["recall@1"] < 0.95   # a non-trivial task


def test_scann_table_agrees_with_exact(pairs):
  trigger, recall, layout = pairs
  exact_config = eval_config.default_config("tiny")
  scann_config = eval_config.default_config("tiny")
  scann_config.index.exact_max_gallery = 0
  scann_config.index.scann.tune_queries = 300
  exact = scoring.score_settings(trigger, recall, layout, ["m-m", "t-m"], exact_config)
  approx = scoring.score_settings(trigger, recall, layout, ["m-m", "t-m"], scann_config)
  for e, a in zip(exact, approx):
    assert a.retrieval["kind"] == "scann" and a.retrieval["recall"] >= 0.99
    for k in exact_config.ks:
      assert abs(a.metrics[f"recall@{k}"] - e.metrics[f"recall@{k}"]) <= 0.01
    assert abs(a.metrics["mrr"] - e.metrics["mrr"]) <= 0.01


def test_missing_modality_is_named(pairs):
  trigger, recall, layout = pairs
  with pytest.raises(DataError, match="setting i-m: no embeddings for modality 'i'"):
    scoring.score_settings(trigger, recall, layout, ["i-m"], eval_config.default_config("tiny"))
  with pytest.raises(DataError, match="equally many"):
    scoring.layout_pairs(["a"], [])
