"""Grain input pipeline: built pair datasets -> host batches in the layout of
docs/architecture.md (`{'trigger': side, 'recall': side, 'valid': bool[B]}`, each side
`{'image': uint8[B,H,W,3], 'text_ids': int32[B,L], 'text_mask': int32[B,L],
'text_empty': bool[B]}`).

Train (`train_dataset`): one global order per epoch (seeded shuffle, reshuffled each
epoch, infinite), process p of P takes positions p, p+P, p+2P, ... of it, so the
processes' shares are disjoint and together cover every epoch. Augmentation draws from
a generator seeded by (seed, global position), so a batch does not depend on the
number of processes, worker processes or threads. Batching happens before the worker
split, so `worker_count` does not change the data either, and the iterator's
`get_state`/`set_state` (what `grain.checkpoint` saves) resumes exactly.

Eval (`eval_dataset`) and catalogs (`make_items_dataset`): fixed order, no augmentation,
every example once; the last batches are padded with `valid=False` rows so every
process yields the same number of full-size batches. These batches also carry string
ids (`trigger_id`/`recall_id`, `listing_id`) for the metrics; they are host-only.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import math
import pathlib
import weakref
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags

from esspr_jax.config.loss import composed_rows_per_process
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.ingest import catalog
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.input import esspr_tfds
from esspr_jax.input import images
# The tokenizer stage's loader: the datasets below load the run's tokenizer by default.
from esspr_jax.input.tokenizer_stage import load_tokenizer, run_tokenizer  # noqa: F401

log = logging.getLogger(__name__)

SIDES = ("trigger", "recall")


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """Everything the loaders need from a run config, as one picklable value."""
  image_size: int
  max_len: int
  with_images: bool = True  # False for a text-only model: no decoding, no 'image' key
  resize_mode: str = "pad"
  augment: images.AugmentParams | None = None  # None: no train-time augmentation
  shuffle_seed: int = 0
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 1
  prefetch: int = 4


def _model_key(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node.get(part) if hasattr(node, "get") else None
    if node is None:
      raise ConfigError(dotted, "is needed by the input pipeline but is not set")
  return node


def spec_from_config(config) -> PipelineSpec:
  """The loaders' settings from a full run config (model keys read defensively)."""
  p = config.data.pipeline
  image = config.get("model", {}).get("image") if hasattr(config, "get") else None
  with_images = bool(image.get("enabled", True)) if image is not None else True
  a = p.augment
  augment = images.AugmentParams(
      crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio), flip_prob=a.flip_prob,
      brightness=a.brightness, contrast=a.contrast, saturation=a.saturation) if a.enabled else None
  return PipelineSpec(
      image_size=int(_model_key(config, "model.image.size")) if with_images else 0,
      max_len=int(_model_key(config, "model.tokenizer.max_len")),
      with_images=with_images, resize_mode=p.resize_mode, augment=augment,
      shuffle_seed=p.shuffle_seed, worker_count=p.worker_count,
      worker_buffer_size=p.worker_buffer_size, read_threads=p.read_threads, prefetch=p.prefetch)


# ----------------------------------------------------------------------------- examples
def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _PrepareSide:
  """One stored side {'id','title','image' bytes} -> {'id','title','image' uint8[S,S,3]}."""

  def __init__(self, spec: PipelineSpec):
    self.spec = spec

  def __call__(self, side: dict, rng: np.random.Generator | None) -> dict:
    out = {"id": _text(side["id"]), "title": _text(side["title"])}
    if self.spec.with_images:
      size = self.spec.image_size
      # Decode at >= the crop's source resolution: a crop keeps at least
      # sqrt(min area) of each side, so decode that much larger.
      target = size if rng is None else math.ceil(size / math.sqrt(self.spec.augment.crop_scale[0]))
      img = images.decode_rgb(side["image"], target)
      if rng is None:
        out["image"] = images.fit_square(img, size, self.spec.resize_mode)
      else:
        out["image"] = images.augment(img, size, rng, self.spec.augment)
    return out


class PrepareTrainPair(grain.transforms.RandomMap):
  """Decodes and augments both sides of a pair with the example's own generator."""

  def __init__(self, spec: PipelineSpec):
    self._side = _PrepareSide(spec)
    self._augment = spec.augment is not None

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    rng = rng if self._augment else None
    out = {s: self._side(element[s], rng) for s in SIDES} | {"valid": True}
    if "source_index" in element:  # kept for the hard-negative side (hard_negatives/feed.py)
      out["source_index"] = element["source_index"]
    return out


class PrepareEvalPair(grain.transforms.Map):
  """Decodes both sides of a pair, deterministic (no augmentation)."""

  def __init__(self, spec: PipelineSpec):
    self._side = _PrepareSide(spec)

  def map(self, element: dict) -> dict:
    return {s: self._side(element[s], None) for s in SIDES} | {"valid": True}


class PrepareItem(grain.transforms.Map):
  """Decodes one catalog listing {'id','title','image'} (no augmentation)."""

  def __init__(self, spec: PipelineSpec):
    self._side = _PrepareSide(spec)

  def map(self, element: dict) -> dict:
    return {"item": self._side(element, None), "valid": True}


class PaddingRow(grain.transforms.Map):
  """The example that fills a last partial batch: blank image, empty title, valid=False."""

  def __init__(self, spec: PipelineSpec, sides: Sequence[str]):
    self._spec = spec
    self._sides = tuple(sides)

  def map(self, element: Any) -> dict:
    del element
    side = {"id": "", "title": ""}
    if self._spec.with_images:
      side["image"] = np.zeros((self._spec.image_size,) * 2 + (3,), np.uint8)
    return {s: dict(side) for s in self._sides} | {"valid": False}


class Collate:
  """Stacks prepared examples into a batch, tokenising each side's titles in one call."""

  def __init__(self, tokenizer, max_len: int, sides: Sequence[str], with_ids: bool):
    self._tokenizer = tokenizer
    self._max_len = max_len
    self._sides = tuple(sides)
    self._with_ids = with_ids

  def __call__(self, examples: Sequence[dict]) -> dict:
    batch: dict[str, Any] = {"valid": np.array([e["valid"] for e in examples], dtype=bool)}
    if "source_index" in examples[0]:
      batch["source_index"] = np.array([e["source_index"] for e in examples], np.int64)
    for s in self._sides:
      rows = [e[s] for e in examples]
      side = dict(self._tokenizer.encode_batch([r["title"] for r in rows], self._max_len))
      if "image" in rows[0]:
        side["image"] = np.stack([r["image"] for r in rows])
      batch[s] = side
      if self._with_ids:
        key = "listing_id" if s == "item" else f"{s}_id"
        batch[key] = np.array([r["id"] for r in rows], dtype=object)
        if s != "item":  # eval pairs: titles for eval.hybrid's lexical scores
          batch[f"{s}_title"] = np.array([r["title"] for r in rows], dtype=object)
    return batch


# ----------------------------------------------------------------------------- loaders
def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _finish(ds: grain.MapDataset, spec: PipelineSpec) -> grain.IterDataset:
  """Threads read/decode whole batches; worker processes split the batches."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=spec.read_threads,
                                            prefetch_buffer_size=spec.prefetch))
  if spec.worker_count > 0:
    _absl_flags_parsed()  # Grain reads its absl flags when it starts the workers
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=spec.worker_count, per_worker_buffer_size=spec.worker_buffer_size),
        worker_init_fn=_worker_init)
    it = _ClosedAtExit(it.map(_own_memory))
  return it


def _own_memory(tree):
  """Batches from worker processes arrive as views of Grain's shared memory; copying
  them into ordinary arrays frees that memory at once instead of whenever (or, for a
  batch still referenced at exit, after) the consumer lets go."""
  if isinstance(tree, dict):
    return {k: _own_memory(v) for k, v in tree.items()}
  if isinstance(tree, np.ndarray) and type(tree) is not np.ndarray:
    return np.array(tree)
  return tree


_LIVE_WORKER_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


class _ClosedAtExit(grain.IterDataset):
  """Worker-backed iterators left open (an eval loop that stops early, a script that
  just ends) are closed at interpreter exit, while modules still exist, so Grain's
  workers and shared memory go away quietly instead of with teardown tracebacks."""

  def __iter__(self):
    iterator = self._parent.__iter__()
    _LIVE_WORKER_ITERATORS.add(iterator)
    return iterator


@atexit.register
def _close_worker_iterators() -> None:
  for iterator in list(_LIVE_WORKER_ITERATORS):
    try:
      iterator.close()
    except Exception:  # noqa: BLE001 - best effort at exit
      pass
  gc.collect()  # finalise dropped iterators (reference cycles) while modules still exist


def _absl_flags_parsed() -> None:
  """Grain's settings are absl flags; outside an absl app (tests, notebooks, library use)
  nothing parses them, so accept their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Worker processes parse no command line either."""
  del worker_index, worker_count
  _absl_flags_parsed()


def _check_batch_size(batch_size: int) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ConfigError("train.batch_size", f"per-process batch size must be >= 1, got {batch_size!r}")


class AttachComposed(grain.transforms.MapWithIndex):
  """Adds batch i of the composed-query stream to batch i of the pairs stream, so one
  saved position (the pairs iterator's) restores both."""

  def __init__(self, composed_batches: grain.MapDataset):
    self._composed = composed_batches

  def map_with_index(self, index: int, element: dict) -> dict:
    composed = self._composed[index]
    return element | {"composed": {s: composed[s] for s in SIDES}}


class _WithSourceIndex(grain.transforms.MapWithIndex):
  """Tags each pair with its position in the source (the hard-negative table's key);
  before the shuffle, so the order and augmentation are unchanged. Grain passes the
  index of the repeated (infinite) dataset, hence the modulo."""

  def __init__(self, size: int):
    self._size = size

  def map_with_index(self, index: int, element: dict) -> dict:
    return dict(element) | {"source_index": index % self._size}


def _shuffled_batches(source: Sequence, tokenizer, spec: PipelineSpec, batch_size: int,
                      seed: int, index: int, count: int,
                      with_source_index: bool = False) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  if with_source_index:
    ds = ds.map_with_index(_WithSourceIndex(len(source)))
  ds = ds.seed(seed).shuffle().repeat(None)
  ds = ds.random_map(PrepareTrainPair(spec))  # seeded by global position: same on any P
  ds = ds[index::count]
  return ds.batch(batch_size, drop_remainder=True,
                  batch_fn=Collate(tokenizer, spec.max_len, SIDES, with_ids=False))


def make_train_dataset(source: Sequence, tokenizer, spec: PipelineSpec, batch_size: int, *,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       composed_source: Sequence | None = None,
                       composed_batch_size: int = 0,
                       hard_negatives: grain.transforms.MapWithIndex | None = None,
                       ) -> grain.IterDataset:
  """Infinite, shuffled, augmented batches of `batch_size` pairs: this process's share.

  `batch_size` is the per-process batch (global // process_count); the trainer
  assembles the global array with `jax.make_array_from_process_local_data`.
  With `composed_source` (modification triplets in the pairs layout) every batch also
  holds `composed`: {'trigger', 'recall'} of `composed_batch_size` rows, drawn from
  their own shuffled, infinite order. With `hard_negatives` (hard_negatives/feed.py's
  AttachHardNegatives) batch i also holds its 'hard_negative' side.
  """
  _check_batch_size(batch_size)
  index, count = _processes(process_index, process_count)
  if len(source) == 0:
    raise DataError("the training dataset is empty")
  ds = _shuffled_batches(source, tokenizer, spec, batch_size, spec.shuffle_seed, index, count,
                         with_source_index=hard_negatives is not None)
  if composed_source is not None:
    if composed_batch_size < 1:
      raise ConfigError("train.composed_batch_size", f"per-process composed batch size must "
                        f"be >= 1, got {composed_batch_size!r}")
    if len(composed_source) == 0:
      raise DataError("the composed-query dataset is empty")
    composed = _shuffled_batches(composed_source, tokenizer, spec, composed_batch_size,
                                 (spec.shuffle_seed + 1) % 2**32, index, count)
    ds = ds.map_with_index(AttachComposed(composed))
  if hard_negatives is not None:
    if spec.worker_count:
      raise ConfigError("data.pipeline.worker_count", "must be 0 with hard negatives on "
                        "(the mined table lives in the main process)")
    ds = ds.map_with_index(hard_negatives)
  return _finish(ds, spec)


def _padded_shards(ds: grain.MapDataset, pad: PaddingRow, batch_size: int, index: int,
                   count: int) -> grain.MapDataset:
  """Process `index`'s strided share, padded to the same whole number of batches on
  every process."""
  shard = ds[index::count]
  per_process = math.ceil(len(ds) / count)
  total = max(1, math.ceil(per_process / batch_size)) * batch_size
  missing = total - len(shard)
  if missing:
    shard = grain.MapDataset.concatenate([shard, grain.MapDataset.range(missing).map(pad)])
  return shard


def make_eval_dataset(source: Sequence, tokenizer, spec: PipelineSpec, batch_size: int, *,
                      process_index: int | None = None,
                      process_count: int | None = None) -> grain.IterDataset:
  """Every pair once, in dataset order, no augmentation; padded last batch(es)."""
  _check_batch_size(batch_size)
  index, count = _processes(process_index, process_count)
  ds = grain.MapDataset.source(source).map(PrepareEvalPair(spec))
  ds = _padded_shards(ds, PaddingRow(spec, SIDES), batch_size, index, count)
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=Collate(tokenizer, spec.max_len, SIDES, with_ids=True))
  return _finish(ds, spec)


def make_items_dataset(items: Sequence, tokenizer, spec: PipelineSpec, batch_size: int, *,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """Batches `{'item': side, 'listing_id': object[B], 'valid': bool[B]}` over a catalog
  (any sequence of {'id','title','image' bytes}), each listing once, padded."""
  _check_batch_size(batch_size)
  index, count = _processes(process_index, process_count)
  ds = grain.MapDataset.source(items).map(PrepareItem(spec))
  ds = _padded_shards(ds, PaddingRow(spec, ("item",)), batch_size, index, count)
  ds = ds.batch(batch_size, drop_remainder=True,
                batch_fn=Collate(tokenizer, spec.max_len, ("item",), with_ids=True))
  return _finish(ds, spec)


# ----------------------------------------------------------------------------- catalogs
class ItemsFromPairs(Sequence):
  """The distinct listings on the given sides of a pairs source (first occurrence wins),
  e.g. the eval gallery: `ItemsFromPairs(source, ('recall',))`."""

  def __init__(self, source: Sequence, sides: Sequence[str] = SIDES):
    self._source = source
    self._where: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i in range(len(source)):
      example = source[i]
      for s in sides:
        listing = _text(example[s]["id"])
        if listing not in seen:
          seen.add(listing)
          self._where.append((i, s))

  def __len__(self) -> int:
    return len(self._where)

  def __getitem__(self, index: int) -> dict:
    i, s = self._where[index]
    return self._source[i][s]


class CatalogItems(Sequence):
  """Listings from a catalog CSV and its image dir, read by the one catalog reader
  (ingest/catalog.py: the rows mining and the export's metadata see).

  Every image is validated once here, like the dataset builder does (bad ones are
  counted and skipped, `strict` raises); items are then read lazily, one file each.
  """

  def __init__(self, csv_path, image_dir, *, strict: bool = False,
               max_bad_fraction: float = 0.1, max_image_side: int | None = 512):
    self._max_side = max_image_side
    self.skips = SkipCounter(f"catalog {csv_path}", strict=strict,
                             max_bad_fraction=max_bad_fraction)
    self._rows: list[tuple[str, str, pathlib.Path]] = []
    for listing in catalog.iter_catalog(str(csv_path), self.skips):
      try:
        path = images.resolve_image_path(image_dir, listing.image)
        images.prepare_for_dataset(path, max_image_side)
      except images.BadImage as e:
        self.skips.reclassify(e.reason, f"{csv_path}:{listing.source_row}", e.detail)
        continue
      self._rows.append((listing.listing_id, listing.title, path))
    self.skips.check_fraction()
    if self.skips.skipped:
      log.warning("catalog %s: %s", csv_path, self.skips.summary())

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> dict:
    listing, title, path = self._rows[index]
    return {"id": listing, "title": title,
            "image": images.prepare_for_dataset(path, self._max_side)}


# ----------------------------------------------------------------------------- from config
def open_source(config, which: str, data_dir=None):
  """Data source of the run's 'train', 'eval' or 'composed' pairs dataset."""
  name = config.data.pipeline[f"{which}_dataset"]
  path = esspr_tfds.dataset_path(esspr_tfds.data_dir_from_config(config, data_dir), name)
  return esspr_tfds.open_pairs_source(path)


def train_dataset(config, batch_size: int, *, data_dir=None, tokenizer=None,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  hard_negatives=None, source=None) -> grain.IterDataset:
  """The run's training batches (this process's `batch_size` share of each);
  `hard_negatives`: the miner's attach transform (hard_negatives/miner.py);
  `source`: pairs to batch instead of the run's dataset (a recipe's own data)."""
  tokenizer = tokenizer or load_tokenizer(config, data_dir)
  composed = {}
  rows = composed_rows_per_process(config, _processes(process_index, process_count)[1])
  if rows:
    composed = dict(composed_source=open_source(config, "composed", data_dir),
                    composed_batch_size=rows)
  if source is None:
    source = open_source(config, "train", data_dir)
  return make_train_dataset(source, tokenizer, spec_from_config(config), batch_size,
                            process_index=process_index, process_count=process_count,
                            hard_negatives=hard_negatives, **composed)


def eval_dataset(config, batch_size: int, *, data_dir=None, tokenizer=None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """The run's eval pairs: every pair once, padded, with ids."""
  tokenizer = tokenizer or load_tokenizer(config, data_dir)
  return make_eval_dataset(open_source(config, "eval", data_dir), tokenizer,
                           spec_from_config(config), batch_size,
                           process_index=process_index, process_count=process_count)
