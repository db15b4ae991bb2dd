"""The 7-setting table on the two small real image+text sets we may use.

    python -m esspr_jax.recipes.eval_real_images --config=configs/demo.py \\
        --checkpoint=/tmp/demo_run --out=/tmp/real_eval [--data_root=../shared/data]

Sets (each 10 pairs of real product photos and titles):
  esspr_sample    the 10 annotated same-style pairs published with the eSSPR paper
                  (`same_trigger_recall_pairs_information`, the sample's header variant)
  promap_laptops  10 laptops, each listed by two shops: listing NNa <-> NNb
                  (esspr_jax.recipes.product_matching.load_promap_laptops)

Each pair is a query (its trigger) against a gallery of the set's 10 recalls, so one
rank moves R@1 by 0.1 and a random model has MRR about 0.29: a check that real photos
and titles flow end to end, not a benchmark. Without --checkpoint the model is the
untouched initialisation (pretrained towers where `init_from` is set, random otherwise).
Writes `<out>/real_images.md`, `<out>/real_images.json` and the tokenizer used,
`<out>/tokenizer.json` (atomically).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from esspr_jax.config import validate_config
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.ingest import release_format
from esspr_jax.input import esspr_tfds, pipeline, tokenizer_stage
from esspr_jax.models import build_model, pretrained
from esspr_jax.models import tokenizer as tokenizer_lib
from esspr_jax.models.model import init_params
from esspr_jax.recipes import product_matching
from esspr_jax.retrieval import evaluate as evaluate_lib
from esspr_jax.retrieval import report as report_lib
from esspr_jax.retrieval import restore

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
SETS = ("esspr_sample", "promap_laptops")
ESSPR_SAMPLE_PAIRS = "same_trigger_recall_pairs_information"


@dataclasses.dataclass(frozen=True)
class RealSet:
  name: str                # also the TFDS dataset name
  pairs_csv: pathlib.Path  # release format (either header variant)
  image_dir: pathlib.Path  # the CSV's image paths resolve against it
  source: str              # one line for the report


def prepare_sets(data_root, work_dir, names: Sequence[str] = SETS) -> list[RealSet]:
  """Locates (esspr_sample) or writes (promap_laptops) each set's pairs CSV."""
  data_root, work_dir = pathlib.Path(data_root), pathlib.Path(work_dir)
  unknown = [n for n in names if n not in SETS]
  if unknown:
    raise ConfigError("sets", f"unknown real-image sets {unknown}; known: {SETS}")
  out = []
  for name in names:
    if name == "esspr_sample":
      folder = data_root / "esspr_sample"
      csv = folder / ESSPR_SAMPLE_PAIRS
      if not csv.is_file():
        raise DataError(f"eSSPR sample pairs not found: {csv}")
      out.append(RealSet(name, csv, folder, "eSSPR paper's annotated sample (Alibaba.com)"))
    else:
      rows = product_matching.load_promap_laptops(data_root)
      csv = work_dir / "promap_laptops_pairs.csv"
      release_format.write_pairs(csv, rows)
      out.append(RealSet(name, csv, data_root / "promap_laptops_10pairs",
                         "ProMap laptops, the same laptop from two Czech shops"))
  return out


def load_model(config, checkpoint=None, step=None):
  """(model, params, description): a trained checkpoint, or the untouched initialisation."""
  if checkpoint:
    model, params, info = restore.load_model_and_params(config, checkpoint, step=step)
    return model, params, f"checkpoint {info['checkpoint']} (step {info['step']})"
  model = build_model(config.model)
  params = init_params(model, jax.random.key(config.seed))
  towers = [t for t in pretrained.TOWER_KEYS if config.model[t].init_from.path]
  if towers:
    params = pretrained.apply_init_from(params, config.model)
  what = f"pretrained {', '.join(towers)}, rest random" if towers else "random"
  return model, nn.unbox(params), f"untouched initialisation ({what}, seed {config.seed})"


def load_tokenizer(config, checkpoint=None, tokenizer_data_dir=None, titles=()):
  """The tokenizer the model was trained with.

  kind 'train' (the demo) caches its tokenizer next to the run's train dataset, so a
  checkpoint needs that data dir (default `<checkpoint>/tfds`); an untrained model gets
  one learnt on the evaluated titles (its embeddings are random either way).
  """
  tok = config.model.tokenizer
  if tok.kind != "train":
    return tokenizer_lib.tokenizer_from_config(tok)
  if checkpoint or tokenizer_data_dir:
    data_dir = pathlib.Path(tokenizer_data_dir or pathlib.Path(checkpoint) / "tfds")
    train_path = esspr_tfds.dataset_path(data_dir, config.data.pipeline.train_dataset)
    if not train_path.is_dir():
      raise ConfigError("tokenizer_data_dir", f"the model's tokenizer was learnt on its train "
                        f"dataset, expected at {train_path}; pass --tokenizer_data_dir=<the "
                        f"run's TFDS dir>")
    return tokenizer_stage.load_tokenizer(config, data_dir)
  return tokenizer_lib.Tokenizer.train(list(titles), tok.vocab_size, tok.lowercase,
                                       tok.strip_accents)


def _titles(sets: Sequence[RealSet]) -> list[str]:
  out = []
  for s in sets:
    for row in release_format.read_pairs(s.pairs_csv):
      out += [row.trigger_title, row.recall_title]
  return out


def markdown_report(sections: Sequence[dict], model_note: str) -> str:
  lines = ["# Real image+text evaluation", "",
           f"Model: {model_note}.", "",
           "Each set is tiny: every pair is a query against a gallery of that set's "
           "recalls, so one rank changes R@1 by 1/queries. Read it as evidence that the "
           "model runs on real photos and titles, not as a benchmark.", ""]
  for s in sections:
    lines += [f"## {s['name']}: {s['queries']} queries, gallery {s['gallery']}", "",
              f"{s['source']}.", "", s["table"]]
  return "\n".join(lines)


def run(config, out_dir, *, checkpoint=None, step=None, data_root=None,
        tokenizer_data_dir=None, sets: Sequence[str] = SETS) -> dict:
  """Builds both sets, embeds them once per modality, scores the settings of
  config.eval.settings; returns (and writes) {'model', 'sets': {name: ...}}."""
  validate_config(config)
  config = copy.deepcopy(config)
  config.data.pipeline.worker_count = 0  # 20 images: a worker process costs more than it saves
  out_dir = pathlib.Path(out_dir).absolute()
  started = time.perf_counter()
  prepared = prepare_sets(data_root or DEFAULT_DATA_ROOT, out_dir, sets)
  model, params, model_note = load_model(config, checkpoint, step)
  tokenizer = load_tokenizer(config, checkpoint, tokenizer_data_dir, _titles(prepared))
  # Kept with the results: WordPiece training breaks ties differently from run to run.
  tokenizer.save(out_dir / "tokenizer.json")
  spec = pipeline.spec_from_config(config)
  sections, summary = [], {"model": model_note, "tokenizer": str(out_dir / "tokenizer.json"),
                           "sets": {}}
  for s in prepared:
    built = esspr_tfds.build_from_config(config, s.pairs_csv, s.image_dir, s.name,
                                         data_dir=out_dir / "tfds")
    if built.num_examples == 0:
      raise DataError(f"{s.name}: no usable pairs in {s.pairs_csv} (build report: "
                      f"{built.report})")
    batches = pipeline.make_eval_dataset(esspr_tfds.open_pairs_source(built.path), tokenizer,
                                         spec, config.eval.batch_size)
    print(f"\n[{s.name}] {s.source}")
    report = evaluate_lib.evaluate(model, params, batches, config, workdir=None)
    sections.append({"name": s.name, "source": s.source, "queries": report.meta["pairs"],
                     "gallery": report.meta["gallery"], "table": report.table})
    summary["sets"][s.name] = {
        "source": s.source, "pairs_csv": str(s.pairs_csv), "image_dir": str(s.image_dir),
        "queries": report.meta["pairs"], "gallery": report.meta["gallery"],
        "build_report": built.report,
        "settings": {r.setting: r.metrics for r in report.results}}
  summary["seconds"] = round(time.perf_counter() - started, 1)
  report_lib.atomic_write(out_dir / "real_images.md", markdown_report(sections, model_note))
  report_lib.atomic_write(out_dir / "real_images.json",
                          json.dumps(summary, indent=2, default=_json_default))
  print(f"\nwritten {out_dir / 'real_images.md'} and real_images.json in {summary['seconds']}s")
  return summary


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  return str(x)


def _define_flags():
  """Flags exist only when this module is the program (importing it defines none)."""
  config = config_flags.DEFINE_config_file("config", str(REPO / "configs" / "demo.py"),
                                           "run config the checkpoint was trained with")
  out = flags.DEFINE_string("out", None, "output directory", required=True)
  checkpoint = flags.DEFINE_string("checkpoint", "", "run dir or checkpoints dir; empty: "
                                   "evaluate the untouched initialisation")
  step = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  data_root = flags.DEFINE_string("data_root", str(DEFAULT_DATA_ROOT),
                                  "folder holding esspr_sample/ and promap_laptops_10pairs/")
  tok_dir = flags.DEFINE_string("tokenizer_data_dir", "", "TFDS dir of the run whose "
                                "tokenizer to use (default: <checkpoint>/tfds)")
  sets = flags.DEFINE_list("sets", list(SETS), "which sets to evaluate")

  def main(argv):
    if len(argv) > 1:
      raise SystemExit(f"unexpected arguments {argv[1:]}")
    try:
      run(config.value, out.value, checkpoint=checkpoint.value or None, step=step.value,
          data_root=data_root.value, tokenizer_data_dir=tok_dir.value or None, sets=sets.value)
    except (ConfigError, DataError) as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 2
    return 0

  return main


if __name__ == "__main__":
  from esspr_jax.cli import run_app  # noqa: E402,PLC0415  (absl's app.run; --help exits 0)
  run_app(_define_flags())
