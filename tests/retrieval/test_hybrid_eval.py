"""eval.hybrid through the real eval path (tiny model, esspr_sample) against a reference."""
import numpy as np
import pytest

from esspr_jax.config import validate_config
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.retrieval import embed, evaluate, metrics, scoring, tfidf_baseline


def _config(tiny, **hybrid):
  config = tiny.config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.settings = "t-t,m-m,i-i"
    config.eval.hybrid.update(enabled=True, **hybrid)
  validate_config(config)
  return config


def _reference(tiny, setting, method, weight, k):
  ids, emb = embed.embed_all(tiny.model, tiny.params, tiny.eval_batches(), ("trigger", "recall"),
                             ("i", "t", "m"))
  layout = scoring.layout_pairs(ids["trigger"], ids["recall"])
  x, y = setting.split("-")
  dense = emb["trigger"][x] @ emb["recall"][y][layout.gallery_rows].T
  gallery = [tiny.source[r]["recall"]["title"] for r in layout.gallery_rows]
  queries = [s["trigger"]["title"] for s in tiny.source]
  lex = tfidf_baseline.tfidf_scores(queries, gallery, fit_on=gallery)
  fused = np.zeros(dense.shape)
  for q in range(dense.shape[0]):
    d, lx = [float(v) for v in dense[q]], [float(v) for v in lex[q]]
    if method == "weighted":
      norm = lambda r: [0.0 if max(r) == min(r) else (v - min(r)) / (max(r) - min(r)) for v in r]  # noqa: E731
      fused[q] = [weight * a + (1 - weight) * b for a, b in zip(norm(d), norm(lx))]
    else:
      rank = lambda r: [1 + sum(u > v for u in r) for v in r]  # noqa: E731
      fused[q] = [1 / (k + a) + 1 / (k + b) for a, b in zip(rank(d), rank(lx))]
  ranks = metrics.pessimistic_ranks(fused, layout.target, layout.ignore)
  return metrics.retrieval_metrics(ranks, tiny.config.eval.ks)


@pytest.mark.parametrize("method, weight", [("weighted", 0.3), ("rrf", 0.5)])
def test_hybrid_rows_match_a_brute_force_reference(tiny, tmp_path, method, weight):
  config = _config(tiny, method=method, weight=weight, rrf_k=7)
  report = evaluate.evaluate(tiny.model, tiny.params, tiny.eval_batches(), config, tmp_path, step=1)
  names = [r.setting for r in report.results]
  assert names == ["t-t", "m-m", "i-i", "t-t+lex", "m-m+lex"]
  for setting in ("t-t", "m-m"):
    got = next(r for r in report.results if r.setting == f"{setting}+lex").metrics
    assert got == pytest.approx(_reference(tiny, setting, method, weight, 7))
  assert "| t-t+lex |" in (tmp_path / "eval" / "latest.md").read_text()
  assert "m-m+lex/mrr" in report.scalars
  # Weight 1 is the dense ranking exactly.
  dense_only = evaluate.evaluate(tiny.model, tiny.params, tiny.eval_batches(),
                                 _config(tiny, weight=1.0), None)
  by = {r.setting: r.metrics for r in dense_only.results}
  assert by["t-t+lex"] == pytest.approx(by["t-t"])


def test_hybrid_needs_titles_and_valid_config(tiny):
  config = _config(tiny)
  batches = [{k: v for k, v in b.items() if k != "recall_title"} for b in tiny.eval_batches()]
  with pytest.raises(DataError, match="eval.hybrid.enabled needs 'recall_title'"):
    evaluate.evaluate(tiny.model, tiny.params, batches, config)
  off = tiny.config  # hybrid off by default: no title needed, no extra rows
  assert not off.eval.hybrid.enabled
  for key, value, match in [("settings", "i-i", "eval.hybrid.settings"),
                            ("method", "max", "eval.hybrid.method"),
                            ("weight", 1.5, "eval.hybrid.weight"),
                            ("rrf_k", 0, "eval.hybrid.rrf_k"),
                            ("candidates", 0, "eval.hybrid.candidates")]:
    bad = tiny.config.copy_and_resolve_references()
    bad.eval.hybrid[key] = value
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
      validate_config(bad)
