"""Interactive search measured on the demo world: photo + a colour word -> that colour.

    python -m esspr_jax.recipes.interactive_search_demo --config=configs/demo.py \\
        --workdir=runs/demo [--category=Mugs] [--changes=red:blue,blue:red,...]

For every listing of `category` whose hidden colour (the world's styles.csv) is the
source colour, the query is the fused view of its photo and the target colour word
("blue"); the gallery is every other listing of the category, embedded as usual (photo
+ title, fused). A query counts when the top hit has the target colour AND the query's
shape: "the same mug, but blue". The photo alone (image-only view) is measured against
the same gallery for comparison; chance is the share of gallery items that qualify.
Prints a Markdown table and writes `<workdir>/interactive_search.json` (atomically).
"""
from __future__ import annotations

import csv
import json
import pathlib
from typing import Sequence

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from esspr_jax import workdir as workdir_lib
from esspr_jax.atomic_io import atomic_open
from esspr_jax.cli import run_app
from esspr_jax.input import images
from esspr_jax.input import tokenizer_stage
from esspr_jax.retrieval import restore

DEFAULT_CHANGES = (("red", "blue"), ("blue", "red"), ("green", "yellow"),
                   ("yellow", "green"), ("black", "white"), ("white", "black"))


def _attributes(world: pathlib.Path) -> dict:
  with open(world / "styles.csv", encoding="utf-8", newline="") as f:
    return {r["style_id"]: dict(kv.split("=", 1) for kv in r["attributes"].split(";"))
            for r in csv.DictReader(f)}


def view_fn(model, modality: str):
  """The jitted (params, side) -> one view; build once per modality, reuse per call."""
  return jax.jit(lambda p, s: model.apply({"params": p}, s, modalities=(modality,))[modality])


def embed_rows(fn, params, sides: dict, batch: int = 64) -> np.ndarray:
  """`fn`'s view of `sides` rows in fixed-size batches (one compile per shape)."""
  n = len(next(iter(sides.values())))
  out = []
  for start in range(0, n, batch):
    chunk = {k: v[start:start + batch] for k, v in sides.items()}
    pad = batch - len(chunk["image"])
    chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in chunk.items()}
    out.append(np.asarray(fn(params, chunk))[:batch - pad])
  return np.concatenate(out)


class DemoCategory:
  """A category of the demo world, its hidden colour/shape, and its gallery embedded."""

  def __init__(self, model, params, tokenizer, config, world, category: str = "Mugs"):
    world = pathlib.Path(world)
    attrs = _attributes(world)
    with open(world / "catalog.csv", encoding="utf-8", newline="") as f:
      rows = [r for r in csv.DictReader(f) if r["cate_name"] == category]
    if not rows:
      raise ValueError(f"the demo world at {world} has no {category!r} listings")
    shape_key = next(k for k in ("shape", "cut", "neck") if k in attrs[rows[0]["style_id"]])
    self.colour = np.array([attrs[r["style_id"]]["colour"] for r in rows])
    self.shape = np.array([attrs[r["style_id"]][shape_key] for r in rows])
    self._views = {m: view_fn(model, m) for m in ("i", "m")}
    self._params, self._tokenizer = params, tokenizer
    self._max_len = config.model.tokenizer.max_len
    size, mode = config.model.image.size, config.data.pipeline.resize_mode
    self._pixels = np.stack([
        images.fit_square(images.decode_rgb((world / r["image"]).read_bytes()), size, mode)
        for r in rows])
    self.gallery = self.embed([r["title"] for r in rows], np.arange(len(rows)), "m")

  def embed(self, texts: Sequence[str], rows: np.ndarray, modality: str) -> np.ndarray:
    side = {k: np.asarray(v) for k, v in self._tokenizer.encode_batch(list(texts),
                                                                      self._max_len).items()}
    return embed_rows(self._views[modality], self._params, dict(side, image=self._pixels[rows]))

  def rates(self, source: str, target: str) -> dict:
    """Top-1 rates for the photos of `source`-coloured listings + the word `target`."""
    queries = np.nonzero(self.colour == source)[0]
    if not len(queries):
      raise ValueError(f"no {source!r} listings in this category")
    fused = self.embed([target] * len(queries), queries, "m")
    photo = self.embed([""] * len(queries), queries, "i")

    def top(q):
      scores = q @ self.gallery.T
      scores[np.arange(len(queries)), queries] = -np.inf  # not the query listing itself
      return scores.argmax(axis=1)

    same_shape = lambda hits: self.shape[hits] == self.shape[queries]
    fused_hits, photo_hits = top(fused), top(photo)
    others = len(self.colour) - 1
    return {
        "source": source, "target": target, "queries": int(len(queries)),
        "fused_target_same_shape": float(np.mean((self.colour[fused_hits] == target)
                                                 & same_shape(fused_hits))),
        "fused_target_colour": float(np.mean(self.colour[fused_hits] == target)),
        "photo_target_same_shape": float(np.mean((self.colour[photo_hits] == target)
                                                 & same_shape(photo_hits))),
        "photo_source_same_shape": float(np.mean((self.colour[photo_hits] == source)
                                                 & same_shape(photo_hits))),
        "chance": float(np.mean([np.sum((self.colour == target) & (self.shape == self.shape[q]))
                                 / others for q in queries])),
    }


def markdown(results: Sequence[dict], category: str) -> str:
  lines = [f"| {category}: photo + word | queries | top hit: word's colour, same shape | "
           "top hit: word's colour | photo alone: word's colour, same shape | "
           "photo alone: own colour, same shape | chance |", "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['source']} + \"{r['target']}\" | {r['queries']} | "
                 f"{r['fused_target_same_shape']:.2f} | {r['fused_target_colour']:.2f} | "
                 f"{r['photo_target_same_shape']:.2f} | {r['photo_source_same_shape']:.2f} | "
                 f"{r['chance']:.3f} |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  fv = flags.FLAGS
  config = fv.config
  workdir = pathlib.Path(fv.workdir).absolute()  # Orbax restores absolute paths only
  world = pathlib.Path(fv.world_dir) if fv.world_dir else workdir / "world"
  model, params, info = restore.load_model_and_params(config, workdir)
  tokenizer = tokenizer_stage.load_tokenizer(config, workdir_lib.default_data_dir(config, workdir))
  demo = DemoCategory(model, params, tokenizer, config, world, fv.category)
  changes = [tuple(c.split(":")) for c in fv.changes.split(",")] if fv.changes else DEFAULT_CHANGES
  results = [demo.rates(s, t) for s, t in changes]
  print(f"checkpoint {info['checkpoint']} (step {info['step']})")
  print(markdown(results, fv.category))
  with atomic_open(workdir / "interactive_search.json", "w") as f:
    json.dump({"checkpoint": str(info["checkpoint"]), "step": info["step"],
               "category": fv.category, "results": results}, f, indent=2)


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "the run's config file", lock_config=False)
  flags.DEFINE_string("workdir", None, "the trained run's workdir (checkpoints, tfds, world)")
  flags.DEFINE_string("world_dir", "", "the demo world ('' = <workdir>/world)")
  flags.DEFINE_string("category", "Mugs", "demo category with colour and shape")
  flags.DEFINE_string("changes", "", "comma list source:target colours ('' = six defaults)")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  _define_flags()
  run_app(main)
