"""Duplicate detection on real titles: walmart_amazon's labelled pairs (label 1 = the same
product, 0 = not), scored by untouched all-MiniLM-L6-v2 (the text tower of
configs/finetune_products_text.py at step 0) and by TF-IDF char 2-5-grams.

The threshold is calibrated on the train split's labelled pairs (the smallest cosine
with precision >= target, esspr_jax/retrieval/duplicates.py) and reported on the test
split's pairs: calibrate on one split, report on the other. The test split's own
calibrated threshold and its best F1 are printed beside it as the in-sample ceiling.

  python benchmarks/duplicates_text.py [--data_root ../shared/data] [--targets 0.9,0.95]
      [--out runs/duplicates_text.json]

Prints a markdown table (docs/results.md, "Duplicate detection").
"""
import argparse
import importlib.util
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from esspr_jax.atomic_io import write_json  # noqa: E402
from esspr_jax.ingest.skips import SkipCounter  # noqa: E402
from esspr_jax.recipes import product_matching  # noqa: E402
from esspr_jax.retrieval import duplicates as dup  # noqa: E402
from esspr_jax.retrieval import tfidf_baseline  # noqa: E402

SPLITS = {"train": "walmart-amazon-train.json.gz", "test": "walmart-amazon-gs.json.gz"}


def labelled_pairs(root: pathlib.Path, split: str) -> tuple[list, list, np.ndarray]:
  """(left titles, right titles, labels) of one split; rows with an empty title are
  dropped (counted in the summary)."""
  skips = SkipCounter(f"walmart_amazon {split}")
  rows = product_matching.read_json_lines(root / "walmart_amazon" / SPLITS[split], skips)
  left, right, labels = [], [], []
  for row in rows:
    a, b = product_matching.clean_title(row["title_left"]), product_matching.clean_title(row["title_right"])
    if a and b:
      left.append(a), right.append(b), labels.append(int(row["label"]))
  return left, right, np.asarray(labels, np.int64)


def tfidf_scorer(fit_titles):
  model = tfidf_baseline.CharNgramTfidf().fit(fit_titles)

  def score(left, right):
    a, b = model.transform(left), model.transform(right)
    return np.asarray(a.multiply(b).sum(axis=1)).ravel()
  return score


def minilm_scorer(batch_size: int = 64):
  import flax.linen as nn  # noqa: PLC0415  (jax and the weights only for this scorer)
  import jax  # noqa: PLC0415
  from esspr_jax.models import pretrained  # noqa: PLC0415
  from esspr_jax.models.model import build_model, example_side  # noqa: PLC0415
  from esspr_jax.models.tokenizer import tokenizer_from_config  # noqa: PLC0415
  from esspr_jax.recipes.finetune_products_text import embed_titles  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("preset", REPO / "configs" / "finetune_products_text.py")
  preset = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(preset)
  config = preset.get_config()
  model = build_model(config.model)
  fresh = jax.jit(model.init)(jax.random.key(0), example_side(config.model))
  params = nn.unbox(pretrained.apply_init_from(fresh["params"], config.model))
  tokenizer = tokenizer_from_config(config.model.tokenizer)
  embed = jax.jit(lambda p, s: model.apply({"params": p}, s, modalities=("t",))["t"])
  max_len = config.model.tokenizer.max_len

  def score(left, right):
    a = embed_titles(embed, params, tokenizer, left, max_len, batch_size)
    b = embed_titles(embed, params, tokenizer, right, max_len, batch_size)
    return np.einsum("nd,nd->n", a.astype(np.float64), b.astype(np.float64))
  return score


def _f(x) -> str:
  return "-" if x is None else f"{x:.4f}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_root", default=str(REPO.parent / "shared" / "data"))
  parser.add_argument("--targets", default="0.9,0.95")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.data_root)
  targets = [float(t) for t in args.targets.split(",")]
  data = {s: labelled_pairs(root, s) for s in SPLITS}
  for s, (_, _, y) in data.items():
    print(f"{s}: {len(y)} labelled pairs, {int(y.sum())} positive")
  scorers = {"TF-IDF char 2-5-grams": tfidf_scorer(data["train"][0] + data["train"][1]),
             "MiniLM-L6 untouched": minilm_scorer()}
  results = []
  print("| method | target precision | threshold (train) | test precision | test recall | "
        "test F1 | test's own threshold (recall) | test best F1 (threshold) |")
  print("|---|---|---|---|---|---|---|---|")
  for name, score in scorers.items():
    start = time.perf_counter()
    scores = {s: score(left, right) for s, (left, right, _) in data.items()}
    seconds = time.perf_counter() - start
    best = dup.sweep(scores["test"], data["test"][2]).best_f1()
    for target in targets:
      cal = dup.calibrate(scores["train"], data["train"][2], target)
      own = dup.calibrate(scores["test"], data["test"][2], target)
      test = (dup.at_threshold(scores["test"], data["test"][2], cal.threshold)
              if cal.reached else None)
      row = {"method": name, "target": target, "train": cal.as_dict(),
             "test_at_train_threshold": test.as_dict() if test else None,
             "test_own": own.as_dict(), "test_best_f1": best.as_dict(), "score_s": seconds}
      results.append(row)
      own_txt = (f"{own.threshold:.4f} ({own.point.recall:.4f})" if own.reached else "none")
      print(f"| {name} | {target} | {_f(cal.threshold)} | "
            f"{_f(test.as_dict()['precision']) if test else '-'} | "
            f"{_f(test.recall) if test else '-'} | {_f(test.f1) if test else '-'} | {own_txt} | "
            f"{best.f1:.4f} ({best.threshold:.4f}) |")
  if args.out:
    write_json(args.out, {"splits": {s: {"pairs": len(y), "positives": int(y.sum())}
                                     for s, (_, _, y) in data.items()}, "results": results})


if __name__ == "__main__":
  main()
