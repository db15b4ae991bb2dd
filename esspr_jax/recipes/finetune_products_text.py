"""Fine-tune all-MiniLM-L6-v2 on real product-matching pairs and show what it buys.

    python -m esspr_jax.recipes.finetune_products_text --workdir=/tmp/ft_products \\
        [--config=configs/finetune_products_text.py] [--config.train.steps=90] \\
        [--data_root=../shared/data]

1. prepare: amazon_google + walmart_amazon (train split) + promap_en_cz positive pairs
   -> `<workdir>/data/train_pairs.csv`; held-out t-t retrieval tasks (walmart_amazon's
   test pairs over its test offers; a held-out slice of amazon_google's gold pairs
   over the whole Google catalog) -> `<workdir>/data/heldout/`; validation tasks carved
   from the training side of both (`recipe.validation_fraction`, not trained on)
   -> `<workdir>/data/validation/`;
2. before: TF-IDF char n-grams and the untouched MiniLM on the held-out tasks;
3. fine-tune with the project's trainer and loss unit (in-batch InfoNCE, t->t), the
   pairs handed over as `train_source` so the trainer's pipeline mines and attaches
   hard negatives (`train.hard_negatives.*`; on in the recipe's config);
4. after: the fine-tuned model on the same tasks, alone and fused with TF-IDF
   (retrieval/fusion.py): the weighted sum's `w` (grid `recipe.hybrid.weights`) and the
   hybrid method are chosen per task on its validation task, then applied unchanged to
   the held-out task; reciprocal-rank fusion (`recipe.hybrid.rrf_k`) is reported too;
5. the table -> stdout, `<workdir>/results.md`, `<workdir>/results.json` (with the
   chosen weights and every validation metric).
Running it again resumes (or reuses) the training checkpoint in `<workdir>/train`.
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from esspr_jax import stages
from esspr_jax.cli import run_app
from esspr_jax.config import validate_config
from esspr_jax.config.checks import check, in_unit, is_number, known_keys, one_of
from esspr_jax.ingest import release_format
from esspr_jax.recipes.training import train_or_stop
from esspr_jax.models import pretrained
from esspr_jax.models.model import build_model, example_side
from esspr_jax.models.tokenizer import tokenizer_from_config
from esspr_jax.recipes import product_matching
from esspr_jax.retrieval import fusion, lexical, metrics
from esspr_jax.retrieval.report import atomic_write

REPO = pathlib.Path(__file__).resolve().parents[2]
KS = (1, 5, 10, 20)
HYBRID_METHODS = ("auto",) + fusion.METHODS

# ----------------------------------------------------------------------------- config

def default_recipe() -> ml_collections.ConfigDict:
  """`config.recipe`: what the recipe (not the trainer) reads."""
  return ml_collections.ConfigDict(dict(
      data_root="",            # '' = ../shared/data next to the repo
      holdout_fraction=0.3,    # of amazon_google's gold pairs (by connected component)
      split_seed=0,
      eval_batch_size=256,
      # of each held-out set's training pairs (by component): the validation tasks the
      # fusion weight and method are chosen on; 0 turns the hybrid rows off
      validation_fraction=0.15,
      hybrid=dict(
          method="auto",       # the 'hybrid (chosen)' row: auto = better on validation
          weights=tuple(round(0.1 * k, 1) for k in range(11)),  # dense weight grid
          rrf_k=60,
      ),
  ))


def validate_recipe(r) -> None:
  """Every `recipe.*` key known and sane (ConfigError naming the key)."""
  known_keys(r, default_recipe(), "recipe")
  check(isinstance(r.data_root, str), "recipe.data_root", f"must be a path string, got {r.data_root!r}")
  check(is_number(r.holdout_fraction) and 0 <= r.holdout_fraction < 1, "recipe.holdout_fraction",
        f"must be in [0, 1), got {r.holdout_fraction!r}")
  check(is_number(r.validation_fraction) and 0 <= r.validation_fraction < 1,
        "recipe.validation_fraction", f"must be in [0, 1), got {r.validation_fraction!r}")
  check(isinstance(r.split_seed, int) and not isinstance(r.split_seed, bool) and r.split_seed >= 0,
        "recipe.split_seed", f"must be an integer >= 0, got {r.split_seed!r}")
  check(isinstance(r.eval_batch_size, int) and r.eval_batch_size >= 1, "recipe.eval_batch_size",
        f"must be an integer >= 1, got {r.eval_batch_size!r}")
  h = r.hybrid
  one_of(h.method, "recipe.hybrid.method", HYBRID_METHODS)
  weights = tuple(h.weights)
  check(len(weights) > 0, "recipe.hybrid.weights", "must be a non-empty grid of weights")
  for w in weights:
    in_unit(w, "recipe.hybrid.weights")
  check(is_number(h.rrf_k) and h.rrf_k > 0, "recipe.hybrid.rrf_k", f"must be > 0, got {h.rrf_k!r}")


# ----------------------------------------------------------------------------- eval

def embed_titles(embed, params, tokenizer, titles: Sequence[str], max_len: int,
                 batch_size: int) -> np.ndarray:
  """[N, E] text embeddings; every call has the same shape (last batch padded)."""
  out = []
  for start in range(0, len(titles), batch_size):
    chunk = list(titles[start:start + batch_size])
    n = len(chunk)
    side = tokenizer.encode_batch(chunk + [""] * (batch_size - n), max_len)
    out.append(np.asarray(embed(params, side))[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def score_metrics(scores: np.ndarray, task: product_matching.RetrievalSet) -> dict:
  """MRR / R@K of one task from its [Q, G] scores (pessimistic ties)."""
  target, ignore = task.targets_and_ignore()
  return metrics.retrieval_metrics(metrics.pessimistic_ranks(scores, target, ignore), KS)


def dense_scores(embed, params, tokenizer, tasks, max_len, batch_size) -> dict:
  """task -> the model's [Q, G] cosine scores."""
  out = {}
  for name, task in tasks.items():
    queries = embed_titles(embed, params, tokenizer, task.query_titles(), max_len, batch_size)
    gallery = embed_titles(embed, params, tokenizer, list(task.gallery.values()), max_len,
                           batch_size)
    out[name] = queries @ gallery.T
  return out


def lexical_scores(tasks) -> dict:
  """task -> TF-IDF [Q, G] scores, fitted on the task's gallery + queries (no labels)."""
  out = {}
  for name, task in tasks.items():
    gallery = list(task.gallery.values())
    scorer = lexical.LexicalScorer(gallery, fit_on=gallery + task.query_titles())
    out[name] = scorer.scores(task.query_titles())
  return out


def table_of(scores: Mapping[str, np.ndarray], tasks) -> dict:
  return {name: score_metrics(scores[name], task) for name, task in tasks.items()}


def choose_hybrid(dense: np.ndarray, lex: np.ndarray, task, hybrid) -> dict:
  """On ONE validation task: the weighted sum's best w, RRF, and the better method."""
  target, ignore = task.targets_and_ignore()
  w, grid = fusion.choose_weight(dense, lex, target, ignore, tuple(hybrid.weights), KS)
  rrf = fusion.fused_metrics("rrf", dense, lex, target, ignore, rrf_k=hybrid.rrf_k, ks=KS)
  weighted = next(row for row in grid if row["weight"] == w)
  if hybrid.method == "auto":
    key = lambda m: (m["recall@1"], m["mrr"])  # noqa: E731
    method = "rrf" if key(rrf) > key(weighted) else "weighted"
  else:
    method = hybrid.method
  return {"weight": w, "method": method, "weighted_grid": grid, "rrf": rrf,
          "dense": score_metrics(dense, task), "lexical": score_metrics(lex, task)}


def hybrid_rows(dense: Mapping[str, np.ndarray], lex: Mapping[str, np.ndarray], tasks,
                choices: Mapping[str, dict], hybrid) -> dict:
  """Held-out rows of the fusions, each task at what its validation task chose."""
  rows = {"hybrid weighted sum (w from validation)": {},
          f"hybrid RRF (k={hybrid.rrf_k:g})": {}, "hybrid (method chosen on validation)": {}}
  for name, task in tasks.items():
    target, ignore = task.targets_and_ignore()
    c = choices[name]
    weighted = fusion.fused_metrics("weighted", dense[name], lex[name], target, ignore,
                                    weight=c["weight"], ks=KS)
    rrf = fusion.fused_metrics("rrf", dense[name], lex[name], target, ignore,
                               rrf_k=hybrid.rrf_k, ks=KS)
    names = list(rows)
    rows[names[0]][name] = weighted
    rows[names[1]][name] = rrf
    rows[names[2]][name] = rrf if c["method"] == "rrf" else weighted
  return rows


# ----------------------------------------------------------------------------- table

def markdown_table(rows: Mapping[str, Mapping[str, dict]]) -> str:
  """rows: method -> task -> metrics; one line per (task, method)."""
  tasks = list(next(iter(rows.values())))
  head = "| held-out task | method | queries | MRR | " + " | ".join(f"R@{k}" for k in KS) + " |"
  lines = [head, "|" + "---|" * (4 + len(KS))]
  for task in tasks:
    for method, per_task in rows.items():
      m = per_task[task]
      lines.append(f"| {task} | {method} | {m['queries']} | {m['mrr']:.4f} | "
                   + " | ".join(f"{m[f'recall@{k}']:.4f}" for k in KS) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- run

def train_source(pairs_csv) -> list[dict]:
  """Text-only pair examples in the layout the Grain pipeline takes; `cate_name` is
  the set and its leaf category, so mined hard negatives stay within both."""
  return [{"trigger": {"id": p.trigger_id, "title": p.trigger_title},
           "recall": {"id": p.recall_id, "title": p.recall_title},
           "cate_name": f"{p.cate_lv1_name}/{p.cate_name}"}
          for p in release_format.read_pairs(pairs_csv)]


def training_variant(config) -> str:
  """What the fine-tuned row's label adds: hard negatives, adaptive loss weighting."""
  parts = []
  if config.train.hard_negatives.enabled:
    h = config.train.hard_negatives
    parts.append(f"hard negatives {h.per_trigger}/pair every {h.every_steps} steps")
  if config.loss.weighting.kind != "fixed":
    parts.append(f"{config.loss.weighting.kind} weighting")
  return "".join(", " + p for p in parts)


def run(config, workdir, data_root=None) -> dict:
  """The whole recipe; returns the results dict also written to `<workdir>/results.json`."""
  started = time.time()
  validate_config(config)
  validate_recipe(config.recipe)
  workdir = pathlib.Path(workdir).absolute()
  r = config.recipe
  data_root = pathlib.Path(data_root or r.data_root or REPO.parent / "shared" / "data")
  prepared = product_matching.prepare(data_root, workdir / "data", r.holdout_fraction,
                                      r.split_seed, validation_fraction=r.validation_fraction)
  logging.info("prepared data: %s", json.dumps(prepared.counts))
  tasks = prepared.heldout
  validation = {n: prepared.validation[n] for n in tasks if n in prepared.validation}

  tokenizer = tokenizer_from_config(config.model.tokenizer)
  model = build_model(config.model)
  max_len = config.model.tokenizer.max_len
  fresh = jax.jit(model.init)(jax.random.key(config.seed), example_side(config.model))
  params = nn.unbox(pretrained.apply_init_from(fresh["params"], config.model))
  del fresh

  embed = jax.jit(lambda p, s: model.apply({"params": p}, s, modalities=("t",))["t"])
  lex = lexical_scores(tasks)
  lex_val = lexical_scores(validation)
  results = {"TF-IDF char 2-5-grams": table_of(lex, tasks)}
  results["MiniLM-L6 untouched"] = table_of(
      dense_scores(embed, params, tokenizer, tasks, max_len, r.eval_batch_size), tasks)
  logging.info("before: %s", json.dumps(results))

  source = train_source(prepared.train_pairs)
  train_start = time.time()
  # The project's own model, loss unit (per-term weights logged) and views.
  result = train_or_stop(config, workdir / "train", train_source=source,
                         hooks=stages.training_hooks(config, workdir / "train",
                                                     train_source=source))
  train_seconds = time.time() - train_start
  tuned = dense_scores(embed, result.state.params, tokenizer, tasks, max_len, r.eval_batch_size)
  results[f"MiniLM-L6 fine-tuned ({result.step} steps{training_variant(config)})"] = table_of(
      tuned, tasks)
  choices = {}
  if len(validation) == len(tasks):
    tuned_val = dense_scores(embed, result.state.params, tokenizer, validation, max_len,
                             r.eval_batch_size)
    choices = {n: choose_hybrid(tuned_val[n], lex_val[n], validation[n], r.hybrid)
               for n in validation}
    results.update(hybrid_rows(tuned, lex, tasks, choices, r.hybrid))
  else:
    logging.warning("no validation task for %s: hybrid rows skipped",
                    sorted(set(tasks) - set(validation)))

  table = markdown_table(results)
  chosen = "; ".join(f"{n}: w={c['weight']:g}, method={c['method']} (validation R@1 dense "
                     f"{c['dense']['recall@1']:.4f}, TF-IDF {c['lexical']['recall@1']:.4f}, "
                     f"weighted {next(g for g in c['weighted_grid'] if g['weight'] == c['weight'])['recall@1']:.4f}, "
                     f"RRF {c['rrf']['recall@1']:.4f})" for n, c in choices.items())
  summary = {
      "results": results,
      "hybrid": {"chosen": {n: {"weight": c["weight"], "method": c["method"]}
                            for n, c in choices.items()},
                 "validation": choices, "rrf_k": r.hybrid.rrf_k,
                 "weights": list(r.hybrid.weights)},
      "data": prepared.counts,
      "train": {"steps": result.step, "batch_size": config.train.batch_size,
                "hard_negatives": config.train.hard_negatives.to_dict(),
                "loss_weighting": config.loss.weighting.to_dict(),
                "train_pairs": len(source), "seconds": round(train_seconds, 1),
                "last_metrics": result.last_metrics},
      "total_seconds": round(time.time() - started, 1),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }
  atomic_write(workdir / "results.md", table + "\n")
  atomic_write(workdir / "results.json", json.dumps(summary, indent=1, default=float))
  print(table)
  if chosen:
    print(f"\nchosen on the validation tasks (dense weight w): {chosen}")
  print(f"\ntrain pairs {len(source)}, {result.step} steps of {config.train.batch_size} in "
        f"{train_seconds:.0f}s; whole recipe {summary['total_seconds']:.0f}s "
        f"on {summary['devices']}. Written to {workdir / 'results.md'}")
  return summary


def _define_flags():
  """Flags exist only when this module is the program (so importing it never clashes
  with another entry point's --config / --workdir)."""
  config = config_flags.DEFINE_config_file(
      "config", str(REPO / "configs" / "finetune_products_text.py"), "recipe config file")
  workdir = flags.DEFINE_string("workdir", None, "output directory", required=True)
  data_root = flags.DEFINE_string(
      "data_root", None, "folder holding amazon_google/, walmart_amazon/, promap_en_cz/")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run(config.value, workdir.value, data_root.value)

  return main


if __name__ == "__main__":
  run_app(_define_flags())
