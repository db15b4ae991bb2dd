"""The eval end to end on the real 10-pair esspr_sample (real images), tiny random model."""
import json

import numpy as np
import pytest

from esspr_jax.errors import DataError
from esspr_jax.retrieval import embed, evaluate, metrics, scoring


def test_embed_drops_padding_after_embedding(tiny):
  config, source, model, params, batches = tiny.config, tiny.source, tiny.model, tiny.params, tiny.eval_batches
  ids, emb = embed.embed_all(model, params, batches(), ("trigger", "recall"), ("i", "t", "m"))
  assert list(ids["trigger"]) == [s["trigger"]["id"] for s in source]
  assert emb["recall"]["m"].shape == (10, config.model.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(emb["trigger"]["i"], axis=1), 1.0, rtol=1e-5)
  # A row's embedding does not depend on the batch it sits in (padding is inert).
  one = next(iter(batches(source[8:9])))
  assert one["valid"].tolist() == [True, False, False, False]
  alone = embed.make_embed_fn(model, ("i", "t", "m"))(params, embed._model_side(one["trigger"]))
  np.testing.assert_allclose(alone["m"][0], emb["trigger"]["m"][8], rtol=2e-4, atol=2e-5)


def test_sample_eval_end_to_end(tiny, tmp_path):
  config, model, params, batches = tiny.config, tiny.model, tiny.params, tiny.eval_batches
  report = evaluate.evaluate(model, params, batches(), config, tmp_path, step=7)
  assert [r.setting for r in report.results] == [f"{q}-{g}" for q in "itm" for g in "itm"]
  # Independent check of one setting from the raw embeddings.
  ids, emb = embed.embed_all(model, params, batches(), ("trigger", "recall"), ("i", "t", "m"))
  gallery_ids, first = np.unique(ids["recall"], return_index=True)
  scores = emb["trigger"]["m"] @ emb["recall"]["m"][first].T
  target = np.searchsorted(gallery_ids, ids["recall"])
  expected = metrics.retrieval_metrics(metrics.pessimistic_ranks(scores, target), config.eval.ks)
  got = next(r for r in report.results if r.setting == "m-m").metrics
  assert got == pytest.approx(expected)
  assert got["queries"] == 10
  written = json.loads((tmp_path / "eval" / "eval_step_7.json").read_text())
  assert written["meta"]["pairs"] == 10 and len(written["settings"]) == 9
  assert (tmp_path / "eval" / "eval_step_7_recall_at_k.png").stat().st_size > 1000
  assert "| m-m |" in (tmp_path / "eval" / "latest.md").read_text()
  assert any((tmp_path / "tensorboard").iterdir())
  assert report.scalars["m-m/mrr"] == pytest.approx(got["mrr"])


def test_hook_returns_scalars_and_text_only_models_skip_image_settings(tiny, tmp_path):
  hook = evaluate.make_eval_hook(tiny.config, tmp_path, tiny.model, tiny.eval_batches)
  scalars = hook(tiny.params, 3)
  assert set(scalars) >= {"i-i/mrr", "m-m/recall_at_20", "t-m/recall_at_1"}
  assert (tmp_path / "eval" / "eval_step_3.md").is_file()
  assert evaluate.servable_settings(tiny.config, ("t",)) == ("t-t",)
  text_only = type("TextOnly", (), {"available": ("t",)})()
  with pytest.raises(DataError, match=r"no \['i'\] embeddings"):
    next(embed.embed_batches(text_only, tiny.params, [], ("trigger",), ("i",)))


def test_layout_ignores_self_and_other_positives():
  layout = scoring.layout_pairs(["a", "a", "b", "c"], ["b", "c", "d", "b"])
  assert list(layout.gallery_ids) == ["b", "c", "d"]
  np.testing.assert_array_equal(layout.target, [0, 1, 2, 0])
  # pair 0 (a->b): c is another positive of a; pair 2 (b->d): b itself is in the gallery.
  assert set(layout.ignore[0]) - {-1} == {1}
  assert set(layout.ignore[1]) - {-1} == {0}
  assert set(layout.ignore[2]) - {-1} == {0}
  assert set(layout.ignore[3]) - {-1} == {1}   # c's own listing is in the gallery


def test_sharded_embedding_matches_single_device(tiny):
  import jax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  params = jax.device_put(tiny.params, NamedSharding(mesh, PartitionSpec()))
  batches = list(tiny.eval_batches())[:1]
  _, plain = embed.embed_all(tiny.model, tiny.params, batches, ("trigger",), ("i", "t", "m"))
  _, sharded = embed.embed_all(tiny.model, params, batches, ("trigger",), ("i", "t", "m"),
                               batch_sharding=NamedSharding(mesh, PartitionSpec("data")))
  for m in "itm":
    np.testing.assert_allclose(sharded["trigger"][m], plain["trigger"][m], rtol=1e-4, atol=1e-5)


def test_batches_without_ids_are_refused(tiny):
  batches = [{k: v for k, v in b.items() if k != "recall_id"} for b in tiny.eval_batches()]
  with pytest.raises(DataError, match="non-empty 'recall_id'"):
    evaluate.evaluate(tiny.model, tiny.params, batches, tiny.config)
