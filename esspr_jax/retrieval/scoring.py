"""From embedded eval pairs to the per-setting retrieval table (no model, no I/O).

Protocol (docs/retrieval.md, "Evaluation protocol"): every annotated pair is a query,
embedded from its trigger in modality x; the gallery is the set of *distinct* recall
products, embedded in modality y; the pair's own recall is the positive. Two kinds of
gallery items do not compete with the positive (see `PairLayout.ignore`): the trigger
itself when it is also some pair's recall, and the trigger's other annotated recalls
(they are correct too).
Ranks are pessimistic in ties (metrics.py).
"""
import collections
import dataclasses
import logging
import time
from typing import Mapping, Sequence

import numpy as np

from esspr_jax.errors import DataError
from esspr_jax.retrieval import fusion, lexical, metrics
from esspr_jax.retrieval import index as index_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PairLayout:
  """Index bookkeeping of an eval pair list: which gallery row each pair targets."""
  trigger_ids: np.ndarray   # [P] str
  recall_ids: np.ndarray    # [P] str
  gallery_ids: np.ndarray   # [G] str, distinct recalls in first-seen order
  gallery_rows: np.ndarray  # [G] int, the pair row whose recall embedding is the gallery item
  target: np.ndarray        # [P] int, gallery index of the pair's recall
  ignore: np.ndarray        # [P, M] int, gallery indices not competing (ABSENT-padded)

  @property
  def num_pairs(self) -> int:
    return len(self.target)


def layout_pairs(trigger_ids: Sequence[str], recall_ids: Sequence[str]) -> PairLayout:
  trigger_ids = np.asarray([str(t) for t in trigger_ids])
  recall_ids = np.asarray([str(r) for r in recall_ids])
  if len(trigger_ids) != len(recall_ids) or len(trigger_ids) == 0:
    raise DataError(f"need equally many (> 0) trigger and recall ids, got "
                    f"{len(trigger_ids)} and {len(recall_ids)}")
  position: dict[str, int] = {}
  rows = []
  for row, rid in enumerate(recall_ids):
    if rid not in position:
      position[rid] = len(rows)
      rows.append(row)
  target = np.array([position[r] for r in recall_ids], np.int64)
  recalls_of = collections.defaultdict(set)
  for t, g in zip(trigger_ids, target):
    recalls_of[t].add(int(g))
  ignores = []
  for t, g in zip(trigger_ids, target):
    skip = set(recalls_of[t])
    if t in position:
      skip.add(position[t])
    skip.discard(int(g))
    ignores.append(sorted(skip))
  width = max(1, max(len(s) for s in ignores))
  ignore = np.full((len(ignores), width), metrics.ABSENT, np.int64)
  for p, s in enumerate(ignores):
    ignore[p, :len(s)] = s
  return PairLayout(trigger_ids, recall_ids, np.asarray(list(position)), np.asarray(rows),
                    target, ignore)


@dataclasses.dataclass
class SettingResult:
  setting: str            # 'x-y': query modality x, gallery modality y
  metrics: dict           # mrr, recall@K, queries
  retrieval: dict         # index report: kind, recall vs exact, settings
  seconds: float


def score_settings(trigger_emb: Mapping[str, np.ndarray], recall_emb: Mapping[str, np.ndarray],
                   layout: PairLayout, settings: Sequence[str], eval_config) -> list[SettingResult]:
  """MRR and Recall@K for each setting; one index per gallery modality.

  Exact galleries give full ranks; ScaNN galleries (above `exact_max_gallery`) give
  ranks within the top `search_depth`, so MRR there is truncated at that depth.
  """
  ks = tuple(eval_config.ks)
  index_config = eval_config.index
  indexes = {}
  results = []
  for setting in settings:
    x, y = setting.split("-")
    missing = [m for m in (x, y) if m not in trigger_emb or m not in recall_emb]
    if missing:
      raise DataError(f"setting {setting}: no embeddings for modality {missing[0]!r} "
                      f"(have {sorted(trigger_emb)})")
    start = time.perf_counter()
    queries = np.asarray(trigger_emb[x], np.float32)
    if y not in indexes:
      gallery = np.asarray(recall_emb[y], np.float32)[layout.gallery_rows]
      indexes[y] = index_lib.build_index(gallery, index_config, tune_queries=queries)
    idx, report = indexes[y]
    if isinstance(idx, index_lib.ExactIndex):
      ranks = idx.ranks(queries, layout.target, layout.ignore)
    else:
      depth = index_config.search_depth + layout.ignore.shape[1]
      ids, scores = idx.search(queries, min(depth, idx.size))
      ranks = metrics.ranks_from_topk(ids, scores, layout.target, layout.ignore)
    result = SettingResult(setting, metrics.retrieval_metrics(ranks, ks),
                           {k: v for k, v in report.items() if k != "build_s"},
                           time.perf_counter() - start)
    log.info("eval %s: %s", setting, result.metrics)
    results.append(result)
  return results


def hybrid_setting_name(setting: str) -> str:
  return f"{setting}+lex"


def score_hybrid(trigger_emb: Mapping[str, np.ndarray], recall_emb: Mapping[str, np.ndarray],
                 layout: PairLayout, trigger_titles: Sequence[str], recall_titles: Sequence[str],
                 settings: Sequence[str], eval_config) -> list[SettingResult]:
  """Rows `<x-y>+lex`: the dense scores of x-y fused with title TF-IDF (eval.hybrid.*).

  The lexical scorer is fitted on the gallery's titles (memory: one sparse [G, V]
  matrix); queries go `index.query_chunk` at a time, dense and lexical [chunk, G] blocks
  fused row by row over the whole gallery (exact, however large the gallery), ranked
  pessimistically like every other row.
  """
  h = eval_config.hybrid
  ks = tuple(eval_config.ks)
  chunk = eval_config.index.query_chunk
  gallery_titles = [str(recall_titles[r]) for r in layout.gallery_rows]
  scorer = lexical.LexicalScorer(gallery_titles)
  queries_titles = [str(t) for t in trigger_titles]
  results = []
  for setting in settings:
    x, y = setting.split("-")
    if x not in trigger_emb or y not in recall_emb:
      raise DataError(f"eval.hybrid.settings: no embeddings for {setting} (have {sorted(trigger_emb)})")
    start = time.perf_counter()
    queries = np.asarray(trigger_emb[x], np.float32)
    gallery = np.asarray(recall_emb[y], np.float32)[layout.gallery_rows]
    ranks = np.empty(len(queries))
    for q0, lex_block in scorer.score_chunks(queries_titles, chunk):
      rows = slice(q0, q0 + len(lex_block))
      fused = fusion.fuse(h.method, queries[rows] @ gallery.T, lex_block, weight=h.weight,
                          rrf_k=h.rrf_k)
      ranks[rows] = metrics.pessimistic_ranks(fused, layout.target[rows], layout.ignore[rows])
    report = {"kind": f"exact fused ({h.method}"
              + (f", w={h.weight:g})" if h.method == "weighted" else f", k={h.rrf_k:g})")}
    result = SettingResult(hybrid_setting_name(setting), metrics.retrieval_metrics(ranks, ks),
                           report, time.perf_counter() - start)
    log.info("eval %s: %s", result.setting, result.metrics)
    results.append(result)
  return results
