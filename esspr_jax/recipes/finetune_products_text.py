"""Fine-tune all-MiniLM-L6-v2 on real product-matching pairs and show what it buys.

    python -m esspr_jax.recipes.finetune_products_text --workdir=/tmp/ft_products \\
        [--config=configs/finetune_products_text.py] [--config.train.steps=90] \\
        [--data_root=../shared/data]

1. prepare: amazon_google + walmart_amazon (train split) + promap_en_cz positive pairs
   -> `<workdir>/data/train_pairs.csv`; held-out t-t retrieval tasks (walmart_amazon's
   test pairs over its test offers; a held-out slice of amazon_google's gold pairs
   over the whole Google catalog) -> `<workdir>/data/heldout/`;
2. before: TF-IDF char n-grams and the untouched MiniLM on the held-out tasks;
3. fine-tune with the project's trainer and loss unit (in-batch InfoNCE, t->t);
4. after: the fine-tuned model on the same tasks;
5. the table -> stdout, `<workdir>/results.md`, `<workdir>/results.json`.
Running it again resumes (or reuses) the training checkpoint in `<workdir>/train`.
"""
from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Mapping, Sequence

from absl import app, flags, logging
import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_flags

from esspr_jax import train as train_lib
from esspr_jax.config import validate_config
from esspr_jax.ingest import release_format
from esspr_jax.input import pipeline
from esspr_jax.recipes import product_matching
from esspr_jax.losses import loss_unit, plan_terms
from esspr_jax.models import pretrained
from esspr_jax.models.model import build_model, example_side
from esspr_jax.models.tokenizer import tokenizer_from_config
from esspr_jax.retrieval import metrics, tfidf_baseline
from esspr_jax.retrieval.report import atomic_write

REPO = pathlib.Path(__file__).resolve().parents[2]
KS = (1, 5, 10, 20)

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


def evaluate_model(embed, params, tokenizer, tasks, max_len, batch_size) -> dict:
  results = {}
  for name, task in tasks.items():
    queries = embed_titles(embed, params, tokenizer, task.query_titles(), max_len, batch_size)
    gallery = embed_titles(embed, params, tokenizer, list(task.gallery.values()), max_len,
                           batch_size)
    results[name] = score_metrics(queries @ gallery.T, task)
  return results


def evaluate_tfidf(tasks) -> dict:
  return {name: score_metrics(tfidf_baseline.tfidf_scores(task.query_titles(),
                                                          list(task.gallery.values())), task)
          for name, task in tasks.items()}


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
  """Text-only pair examples in the layout the Grain pipeline takes."""
  return [{"trigger": {"id": p.trigger_id, "title": p.trigger_title},
           "recall": {"id": p.recall_id, "title": p.recall_title}}
          for p in release_format.read_pairs(pairs_csv)]


def run(config, workdir, data_root=None) -> dict:
  """The whole recipe; returns the results dict also written to `<workdir>/results.json`."""
  started = time.time()
  validate_config(config)
  workdir = pathlib.Path(workdir).absolute()
  r = config.recipe
  data_root = pathlib.Path(data_root or r.data_root or REPO.parent / "shared" / "data")
  prepared = product_matching.prepare(data_root, workdir / "data", r.holdout_fraction,
                                      r.split_seed)
  logging.info("prepared data: %s", json.dumps(prepared.counts))
  tasks = prepared.heldout

  tokenizer = tokenizer_from_config(config.model.tokenizer)
  model = build_model(config.model)
  max_len = config.model.tokenizer.max_len
  fresh = jax.jit(model.init)(jax.random.key(config.seed), example_side(config.model))
  params = nn.unbox(pretrained.apply_init_from(fresh["params"], config.model))
  del fresh

  embed = jax.jit(lambda p, s: model.apply({"params": p}, s, modalities=("t",))["t"])
  results = {"TF-IDF char 2-5-grams": evaluate_tfidf(tasks)}
  results["MiniLM-L6 untouched"] = evaluate_model(embed, params, tokenizer, tasks, max_len,
                                                  r.eval_batch_size)
  logging.info("before: %s", json.dumps(results))

  source = train_source(prepared.train_pairs)
  dataset = pipeline.make_train_dataset(source, tokenizer, pipeline.spec_from_config(config),
                                        train_lib.per_process_batch_size(config))
  train_start = time.time()
  result = train_lib.train(config, workdir / "train", model=model,
                           loss_fn=functools.partial(loss_unit, config=config.loss),
                           views=plan_terms(config.loss).views(), train_dataset=dataset)
  train_seconds = time.time() - train_start
  results[f"MiniLM-L6 fine-tuned ({result.step} steps)"] = evaluate_model(
      embed, result.state.params, tokenizer, tasks, max_len, r.eval_batch_size)

  table = markdown_table(results)
  summary = {
      "results": results,
      "data": prepared.counts,
      "train": {"steps": result.step, "batch_size": config.train.batch_size,
                "train_pairs": len(source), "seconds": round(train_seconds, 1),
                "last_metrics": result.last_metrics},
      "total_seconds": round(time.time() - started, 1),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }
  atomic_write(workdir / "results.md", table + "\n")
  atomic_write(workdir / "results.json", json.dumps(summary, indent=1, default=float))
  print(table)
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
  from esspr_jax.cli import run_app  # noqa: PLC0415  (absl's app.run; --help exits 0)
  run_app(_define_flags())
