"""The real-image eval recipe, end to end on both 10-pair sets with a tiny random model."""
import json

import numpy as np
import pytest

from esspr_jax.config import compose
from esspr_jax.ingest import release_format
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.models.tokenizer import Tokenizer
from esspr_jax.recipes import eval_real_images as recipe

SETTINGS = ("i-i", "i-t", "i-m", "t-i", "t-t", "t-m", "m-m")


@pytest.fixture(scope="module")
def tiny_config():
  return compose("tiny")


@pytest.fixture(scope="module")
def result(tiny_config, shared_data, tmp_path_factory):
  out = tmp_path_factory.mktemp("real_images")
  summary = recipe.run(tiny_config, out, data_root=shared_data)
  return out, summary


def test_writes_both_sets_with_seven_settings(result):
  out, summary = result
  on_disk = json.loads((out / "real_images.json").read_text())
  assert set(on_disk["sets"]) == {"esspr_sample", "promap_laptops"}
  assert on_disk["model"].startswith("untouched initialisation (random")
  markdown = (out / "real_images.md").read_text()
  for name, s in on_disk["sets"].items():
    assert s["queries"] == 10 and s["gallery"] == 10, name
    assert f"## {name}: 10 queries, gallery 10" in markdown
    assert tuple(s["settings"]) == SETTINGS
    for setting, m in s["settings"].items():
      # A gallery of 10: the positive is always within the top 10, ranks are 1..10.
      assert m["recall@10"] == 1.0, (name, setting)
      assert 0.1 <= m["mrr"] <= 1.0
      assert m["recall@1"] * 10 == pytest.approx(round(m["recall@1"] * 10))
  assert summary["sets"].keys() == on_disk["sets"].keys()


def test_promap_pairs_are_the_two_shops_of_each_laptop(result):
  out, _ = result
  rows = list(release_format.read_pairs(out / "promap_laptops_pairs.csv"))
  assert len(rows) == 10
  for row in rows:
    assert row.trigger_id.endswith("a") and row.recall_id.endswith("b")
    assert row.trigger_id[:-1] == row.recall_id[:-1]


def test_text_table_matches_an_independent_ranking(result, tiny_config, shared_data, tmp_path):
  """t-t MRR recomputed by hand: embed the titles directly, rank with numpy."""
  out, summary = result
  sets = recipe.prepare_sets(shared_data, tmp_path)
  tokenizer = Tokenizer.load(out / "tokenizer.json")  # the one the recipe learnt
  model, params, _ = recipe.load_model(tiny_config)
  rows = list(release_format.read_pairs(sets[0].pairs_csv))
  assert sets[0].name == "esspr_sample" and len({r.recall_id for r in rows}) == len(rows)

  def embed(titles):
    side = tokenizer.encode_batch(titles, tiny_config.model.tokenizer.max_len)
    return np.asarray(model.apply({"params": params}, side, modalities=("t",))["t"])

  scores = embed([r.trigger_title for r in rows]) @ embed([r.recall_title for r in rows]).T
  positive = np.diag(scores)
  # Pessimistic ties: every other recall scoring >= the positive ranks above it; the
  # positive itself is counted once by the same comparison.
  ranks = (scores >= positive[:, None]).sum(axis=1)
  want = float(np.mean(1.0 / ranks))
  got = summary["sets"]["esspr_sample"]["settings"]["t-t"]["mrr"]
  assert got == pytest.approx(want, abs=1e-4)


def test_bad_inputs_name_the_problem(tiny_config, shared_data, tmp_path):
  with pytest.raises(ConfigError, match="unknown real-image sets"):
    recipe.prepare_sets(shared_data, tmp_path, ["imagenet"])
  with pytest.raises(DataError, match="eSSPR sample pairs not found"):
    recipe.prepare_sets(tmp_path, tmp_path, ["esspr_sample"])
  with pytest.raises(DataError, match="no checkpoints under"):
    recipe.load_model(tiny_config, checkpoint=tmp_path)
  with pytest.raises(ConfigError, match="tokenizer was learnt on its train dataset"):
    recipe.load_tokenizer(tiny_config, checkpoint=tmp_path)
