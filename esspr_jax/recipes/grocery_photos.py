"""A shopper's shelf photo -> the shop's listing, on real photos of unseen products.

    python -m esspr_jax.recipes.grocery_photos --workdir=/tmp/grocery \\
        [--data_root=../shared/data] [--photos=other_split.csv] [--steps=60]

Data: ../shared/data/grocery_store (MIT; its SOURCE.md): 81 products, each with one
web-shop listing (studio image + title) and smartphone photos taken on store shelves.
Split by product: products with an even `group_id` are for training, odd ones are never
trained on. Queries are the odd products' `val` photos; the gallery is all 81 listings
(so a query also competes with every training product). `--photos` takes another
photo list of metadata.csv's layout (image_path, split, group_id, ...; paths relative
to the grocery_store folder); listings always come from metadata.csv's iconic rows.

Settings (query view -> listing view): i-i (photo vs listing image), i-m (photo vs
listing image + title), t-m (the product's name as words, one query per odd product,
vs the listing).

Rows:
  untouched   EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, nothing trained: the
              fused head has no layers (masked mean of the projected tokens), its text
              projection starts as the identity (so t is MiniLM's own embedding) and its
              image projection random (1280 -> 384, roughly distance-preserving);
  fine-tuned  the same model trained on the even products' train photos: pairs (shelf
              photo -> its listing), the loss unit's terms that apply: i->m and t->m
              PPM hinges (the trigger's words are the product's name), PDC/PLC on i;
  ViT scratch the same recipe with the image tower a ViT trained from scratch (MiniLM
              text as above).
Everything else (batch, steps, image size) is in `recipe_config()`; the table goes to
stdout, `<workdir>/results.md` and `.json`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import time
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from esspr_jax import stages
from esspr_jax.atomic_io import atomic_write
from esspr_jax.config import compose, validate_config
from esspr_jax.errors import DataError
from esspr_jax.input import pipeline
from esspr_jax.models import pretrained
from esspr_jax.models.model import build_model, example_side
from esspr_jax.models.tokenizer import tokenizer_from_config
from esspr_jax.recipes.training import train_or_stop
from esspr_jax.retrieval import embed as embed_lib
from esspr_jax.retrieval import metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
KS = (1, 5, 10, 20)
BATCH = 32  # embedding batch
SETTINGS = (("i-i", "i", "i"), ("i-m", "i", "m"), ("t-m", "t", "m"))
FOLDER = "grocery_store"


@dataclasses.dataclass(frozen=True)
class Photo:
  path: str       # relative to the grocery_store folder
  group_id: int


@dataclasses.dataclass(frozen=True)
class Listing:
  group_id: int
  name: str       # the product's name as words (query of the t-m setting)
  title: str
  path: str


@dataclasses.dataclass(frozen=True)
class GrocerySplit:
  root: pathlib.Path
  listings: tuple      # all 81, gallery order
  train_photos: tuple  # even products, split 'train'
  queries: tuple       # odd products, split 'val'

  @property
  def counts(self) -> dict:
    return {"listings": len(self.listings), "train_photos": len(self.train_photos),
            "train_products": len({p.group_id for p in self.train_photos}),
            "query_photos": len(self.queries),
            "query_products": len({p.group_id for p in self.queries})}


def _rows(path: pathlib.Path) -> list[dict]:
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e})") from e
  need = {"image_path", "split", "group_id"}
  if rows and not need <= set(rows[0]):
    raise DataError(f"{path}: needs columns {sorted(need)}, has {sorted(rows[0])}")
  return rows


def load_grocery(data_root, photos_csv=None) -> GrocerySplit:
  """The product split (see module doc); `photos_csv` replaces the photo list."""
  root = pathlib.Path(data_root) / FOLDER
  meta = _rows(root / "metadata.csv")
  listings = sorted((Listing(int(r["group_id"]), r["group_name"].replace("-", " "),
                             r["title"], r["image_path"])
                     for r in meta if r["split"] == "iconic"), key=lambda x: x.group_id)
  known = {x.group_id for x in listings}
  photos = _rows(pathlib.Path(photos_csv)) if photos_csv else meta
  train, queries = [], []
  for r in photos:
    gid = int(r["group_id"])
    if r["split"] == "iconic":
      continue
    if gid not in known:
      raise DataError(f"{photos_csv or root / 'metadata.csv'}: group_id {gid} has no listing")
    photo = Photo(r["image_path"], gid)
    if gid % 2 == 0 and r["split"] == "train":
      train.append(photo)
    elif gid % 2 == 1 and r["split"] == "val":
      queries.append(photo)
  if not queries:
    raise DataError(f"{photos_csv or root}: no 'val' photos of odd-group_id products")
  return GrocerySplit(root, tuple(listings), tuple(train), tuple(queries))


# ----------------------------------------------------------------------------- config

def recipe_config(image_kind: str = "efficientnet_lite0", steps: int = 60,
                  image_size: int = 160):
  """The run config for one row: MiniLM text, EfficientNet-Lite0 or a fresh ViT."""
  config = compose("demo")
  folder = pretrained.minilm_dir(verify=False)
  with config.unlocked():
    m = config.model
    m.text.update(pretrained.hf_text_config(folder))
    m.text.max_positions = 32
    m.text.init_from.update(path=pretrained.MINILM_NAME, format="hf_bert",
                            sha256=pretrained.MINILM_SHA256)
    m.tokenizer.update(kind="vocab_txt", path=str(folder / "vocab.txt"), max_len=32)
    m.fused.update(num_layers=0, pool="mean", input_proj=True, output_proj=False,
                   width=m.text.width)
    m.embed_dim = m.text.width
    m.logit_scale_init = math.log(20.0)
    if image_kind == "efficientnet_lite0":
      m.image.update(kind="efficientnet_lite0", size=image_size, batch_norm="frozen",
                     mean=(127 / 255,) * 3, std=(128 / 255,) * 3)  # the TF-Lite convention
      m.image.init_from.update(path=pretrained.EFFICIENTNET_NAME, format="efficientnet_lite0_pth")
    else:
      m.image.update(kind="vit", size=image_size, patch=16, width=192, depth=4, heads=4,
                     mlp_dim=384)
    loss = config.loss
    for pair in loss.pairs.keys():
      loss.pairs[pair].weight = 0.0
    loss.pairs.i_m.update(kind="hinge", weight=1.0)
    loss.pairs.t_m.update(kind="hinge", weight=1.0)
    loss.pdc.t.weight = 0.0
    loss.plc.t.weight = 0.0
    loss.composed.weight = 0.0
    t = config.train
    t.batch_size = 32
    t.steps = steps
    t.optimizer.learning_rate = 1e-4 if image_kind == "efficientnet_lite0" else 3e-4
    t.schedule.warmup_steps = max(1, steps // 10)
    t.log_every = 10
    t.checkpoint.every = steps
  return config


# ----------------------------------------------------------------------------- embedding

def _embedded(model, params, items: Sequence[dict], tokenizer, config, modalities,
              with_images: bool = True) -> dict:
  """{modality: [N, E]} of catalog-style items ({'id','title','image' bytes}), through the
  project's items loader and embedding loop (every batch the same shape, last one padded)."""
  spec = dataclasses.replace(pipeline.spec_from_config(config), with_images=with_images,
                             worker_count=0)  # ~100 images: a worker costs more than it saves
  batches = pipeline.make_items_dataset(items, tokenizer, spec, BATCH, process_index=0,
                                        process_count=1)
  return embed_lib.embed_all(model, params, batches, ("item",), modalities)[1]["item"]


def evaluate(model, params, split: GrocerySplit, tokenizer, config) -> dict:
  """MRR / R@K of the three settings (pessimistic ties)."""
  gid_to_row = {x.group_id: i for i, x in enumerate(split.listings)}
  gallery = _embedded(model, params, [
      {"id": f"listing/{x.group_id}", "title": x.title, "image": (split.root / x.path).read_bytes()}
      for x in split.listings], tokenizer, config, ("i", "m"))
  photo_queries = _embedded(model, params, [
      {"id": p.path, "title": "", "image": (split.root / p.path).read_bytes()}
      for p in split.queries], tokenizer, config, ("i",))["i"]
  odd = sorted({p.group_id for p in split.queries})
  name_queries = _embedded(model, params, [
      {"id": str(g), "title": split.listings[gid_to_row[g]].name, "image": b""} for g in odd],
      tokenizer, config, ("t",), with_images=False)["t"]
  out = {}
  for name, qv, gv in SETTINGS:
    queries, ids = (photo_queries, [p.group_id for p in split.queries]) if qv == "i" \
        else (name_queries, odd)
    target = np.array([gid_to_row[g] for g in ids])
    ranks = metrics.pessimistic_ranks(queries @ gallery[gv].T, target)
    out[name] = dict(metrics.retrieval_metrics(ranks, KS), queries=len(ids))
  return out


# ----------------------------------------------------------------------------- training

def train_source(split: GrocerySplit) -> list[dict]:
  """(shelf photo + the product's name) -> (listing image + title) pair examples."""
  by_gid = {x.group_id: x for x in split.listings}
  out = []
  for photo in split.train_photos:
    listing = by_gid[photo.group_id]
    out.append({
        "trigger": {"id": photo.path, "title": listing.name,
                    "image": (split.root / photo.path).read_bytes()},
        "recall": {"id": f"listing/{listing.group_id}", "title": listing.title,
                   "image": (split.root / listing.path).read_bytes()}})
  return out


def _initial_values(config, model):
  """Pretrained towers, and the fused head's text projection as the identity."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), example_side(config.model))["params"]
  values = {t: pretrained.init_from_values(shapes, config.model, t) for t in ("text", "image")}
  width = config.model.text.width
  values["fused"] = {"text_proj/kernel": np.eye(width, dtype=np.float32),
                     "text_proj/bias": np.zeros((width,), np.float32)}
  if values["image"]:  # a pretrained image tower: a seeded Gaussian projection (JL-style)
    fan_in = shapes["fused"]["image_proj"]["kernel"].value.shape[0]
    rng = np.random.default_rng(config.seed)
    values["fused"]["image_proj/kernel"] = (rng.standard_normal((fan_in, width)) /
                                            math.sqrt(width)).astype(np.float32)
    values["fused"]["image_proj/bias"] = np.zeros((width,), np.float32)
    values["logit_scale"] = np.float32(config.model.logit_scale_init)
    values["logit_bias"] = np.float32(config.model.logit_bias_init)
  return values


def _filled(config, model, values) -> dict:
  """The initial params without running init: every leaf must come from `values`."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                   example_side(config.model))["params"])
  params = {}
  for key, sub in shapes.items():
    given = values.get(key)
    params[key] = (given if not isinstance(sub, dict)
                   else pretrained.replace_leaves(sub, given or {}))
  missing = [p for p, leaf in pretrained.flat_params(params).items()
             if not isinstance(leaf, (np.ndarray, np.generic))]
  if missing:
    raise ValueError(f"initial values lack {missing[:5]}")
  return params


def run_row(config, workdir: pathlib.Path, split: GrocerySplit, train: bool) -> tuple:
  """(metrics, info) of one row: evaluate the initial model, or train then evaluate."""
  validate_config(config)
  tokenizer = tokenizer_from_config(config.model.tokenizer)
  bare = build_model(config.model)
  values = _initial_values(config, bare)
  model = pretrained.PretrainedInit(bare, {k: v for k, v in values.items() if isinstance(v, dict)})
  started = time.time()
  info = {}
  if train:
    # The trainer's own loss unit and views (the model: pretrained towers as set above).
    source = train_source(split)
    result = train_or_stop(config, workdir, model=model, train_source=source,
                           hooks=stages.training_hooks(config, workdir, train_source=source))
    params = result.state.params
    info = {"steps": result.step, "train_seconds": round(time.time() - started, 1)}
  else:
    params = _filled(config, bare, values)
  print(f"[grocery] {workdir.name}: initial/trained params after {time.time() - started:.0f}s",
        flush=True)
  results = evaluate(bare, params, split, tokenizer, config)
  info["seconds"] = round(time.time() - started, 1)
  print(f"[grocery] {workdir.name}: {json.dumps(results)} ({info})", flush=True)
  return results, info


def markdown_table(rows: dict) -> str:
  head = "| setting | model | queries | MRR | " + " | ".join(f"R@{k}" for k in KS) + " |"
  lines = [head, "|" + "---|" * (4 + len(KS))]
  for setting, _, _ in SETTINGS:
    for method, per in rows.items():
      m = per[setting]
      lines.append(f"| {setting} | {method} | {m['queries']} | {m['mrr']:.4f} | "
                   + " | ".join(f"{m[f'recall@{k}']:.4f}" for k in KS) + " |")
  return "\n".join(lines)


def run(workdir, data_root=None, photos=None, steps: int = 60, image_size: int = 160) -> dict:
  started = time.time()
  workdir = pathlib.Path(workdir).absolute()
  split = load_grocery(data_root or REPO.parent / "shared" / "data", photos)
  rows, infos = {}, {}
  effnet = recipe_config("efficientnet_lite0", steps, image_size)
  rows["EfficientNet-Lite0 + MiniLM untouched"], infos["untouched"] = run_row(
      effnet, workdir / "untouched", split, train=False)
  name = f"EfficientNet-Lite0 + MiniLM fine-tuned ({steps} steps)"
  rows[name], infos["fine-tuned"] = run_row(effnet, workdir / "finetuned", split, train=True)
  vit = recipe_config("vit", steps, image_size)
  rows[f"ViT from scratch + MiniLM ({steps} steps)"], infos["vit"] = run_row(
      vit, workdir / "vit_scratch", split, train=True)
  table = markdown_table(rows)
  summary = {"results": rows, "rows": infos, "data": split.counts,
             "total_seconds": round(time.time() - started, 1)}
  atomic_write(workdir / "results.md", table + "\n")
  atomic_write(workdir / "results.json", json.dumps(summary, indent=1, default=float))
  print(table)
  print(f"\n{json.dumps(split.counts)}; whole recipe {summary['total_seconds']:.0f}s. "
        f"Written to {workdir / 'results.md'}")
  return summary


def _define_flags():
  workdir = flags.DEFINE_string("workdir", None, "output directory", required=True)
  data_root = flags.DEFINE_string("data_root", None, "folder holding grocery_store/")
  photos = flags.DEFINE_string("photos", None, "photo list CSV in metadata.csv's layout")
  # Defaults: the run docs/results.md reports (1,187 s on 2 shared cores); --steps=60
  # --image_size=160 is the longer run for a faster machine.
  steps = flags.DEFINE_integer("steps", 12, "training steps per trained row")
  size = flags.DEFINE_integer("image_size", 96, "image side in pixels (multiple of 32)")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run(workdir.value, data_root.value, photos.value, steps.value, size.value)
  return main


if __name__ == "__main__":
  from esspr_jax.cli import run_app  # (absl's app.run; --help exits 0)
  run_app(_define_flags())
