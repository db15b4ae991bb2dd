"""When and how the trainer mines: embed the training catalog with the current params,
mine the table, install it, save it; keep the cost a bounded fraction of training.

At the start a run reloads the versions saved at or before its checkpoint step (the
schedule with them); with none, it mines before its first step, and that table applies
from the first batch. Later minings apply from `lag` batches ahead, past every batch
the pipeline and the prefetcher may already have built, so the batch a table first
applies to does not depend on timing, and a resumed run builds the same batches.
Mining at step s happens before the checkpoint of step s is written, so that
checkpoint's resume always finds the table.

The Miner is the train loop's hook (esspr_jax/hooks.py): it adds the 'hard_negative'
side to the step's views and its `attach` transform to the pipeline, reloads or mines
at the start, and mines when due; stages.training_hooks builds it.
"""
import logging
import math
import pathlib
import time
from typing import Optional, Tuple

import jax
import numpy as np

from esspr_jax import batch_layout
from esspr_jax import hooks
from esspr_jax.errors import ConfigError
from esspr_jax.hard_negatives.catalog import TrainingCatalog
from esspr_jax.hard_negatives.feed import (AttachHardNegatives, Version, Versions,
                                           load_versions, save_version)
from esspr_jax.hard_negatives.table import mine_table
from esspr_jax.input import pipeline
from esspr_jax.retrieval import embed

log = logging.getLogger(__name__)

SIDE = batch_layout.HARD_NEGATIVE


def lookahead(config) -> int:
  """Batches the pipeline (read buffer and threads) and the prefetcher may have built
  beyond the consumed ones, plus one in hand: a new table applies that far ahead."""
  p = config.data.pipeline
  depth = 0 if config.train.sync_loop else config.train.prefetch
  return int(depth) + int(p.prefetch) + int(p.read_threads) + 2


class Miner(hooks.Hook):
  """The run's hard-negative state: catalog, table versions, schedule; the loop's hook."""

  def __init__(self, config, directory, source, tokenizer, batch_size: int):
    h = config.train.hard_negatives
    self.per_trigger = int(h.per_trigger)
    self.side_rows = {SIDE: self.per_trigger}
    self.every = int(h.every_steps)
    self.max_cost_fraction = float(h.max_cost_fraction)
    self.directory = pathlib.Path(directory)
    self.lag = lookahead(config)
    self._spec = pipeline.spec_from_config(config)
    self._tokenizer = tokenizer
    self._batch_size = batch_size
    # Categories of eval.index.exact_max_gallery listings or more are searched through
    # a tuned ScaNN index, as retrieval searches a gallery that large (mine.py).
    self._index_config = config.eval.index if "eval" in config else None
    self.catalog = TrainingCatalog(source)
    self.versions = Versions()
    prepare_item = pipeline.PrepareItem(self._spec)
    self.attach = AttachHardNegatives(
        self.catalog, self.versions, self.per_trigger,
        lambda stored: prepare_item.map(stored)["item"],
        pipeline.Collate(tokenizer, self._spec.max_len, (SIDE,), with_ids=False))
    self.next_step = 0
    self._trained_since = None  # monotonic time the last mining ended

  def resume(self, start_step: int) -> int:
    """Reloads the versions mined at or before `start_step`; returns how many."""
    saved = load_versions(self.directory, start_step, pairs=len(self.catalog.trigger_row),
                          listings=len(self.catalog), per_trigger=self.per_trigger)
    for version in saved:
      self.versions.install(version)
    self.next_step = saved[-1].next_step if saved else start_step
    return len(saved)

  def views(self, views):
    """The step's views plus 'hard_negative', embedded like the recall side."""
    return batch_layout.with_hard_negative_side(views)

  def on_start(self, ctx: hooks.Context, state, step: int) -> None:
    """A fresh table before the first batch; or the mining a finished run skipped."""
    resumed = self.resume(step)
    if not resumed or (self.due(step) and step < ctx.steps):
      self.mine_and_log(ctx, state.params, step, at_start=not resumed)

  def due(self, step: int) -> bool:
    return step >= self.next_step

  def run(self, ctx: hooks.Context, state, step: int) -> None:
    self.mine_and_log(ctx, state.params, step, at_start=False)

  def embed_catalog(self, model, params, modality: str, batch_sharding) -> np.ndarray:
    batches = pipeline.make_items_dataset(self.catalog, self._tokenizer, self._spec,
                                          self._batch_size, process_index=0, process_count=1)
    _, vectors = embed.embed_all(model, params, batches, ("item",), (modality,),
                                 batch_sharding=batch_sharding)
    return vectors["item"][modality]

  def mine(self, model, params, step: int, *, at_start: bool, modality: str = "m",
           batch_sharding=None) -> Tuple[dict, Optional[str]]:
    """Mines at `step`, installs and saves the table; (metrics, a log line or None)."""
    # The train loop dispatches steps ahead of their results; waiting for them here
    # books their time to training, not to this mining (the cost bound compares the two).
    jax.block_until_ready(params)
    trained = None if self._trained_since is None else time.monotonic() - self._trained_since
    start = time.monotonic()
    embeddings = self.embed_catalog(model, params, modality, batch_sharding)
    embed_seconds = time.monotonic() - start
    table, scores = mine_table(self.catalog, embeddings, self.per_trigger,
                               index_config=self._index_config)
    seconds = time.monotonic() - start
    interval, note = self.every, None
    if self.max_cost_fraction > 0 and trained:
      per_step = trained / max(1, step - self.versions.latest.mined_step)
      wanted = math.ceil(seconds / (self.max_cost_fraction * per_step))
      if wanted > interval:
        interval = wanted
        note = (f"hard negatives: mining took {seconds:.2f}s, over "
                f"train.hard_negatives.max_cost_fraction={self.max_cost_fraction} of "
                f"{per_step:.3f}s/step x {self.every} steps; next mining in {interval} steps")
    first_batch = step if at_start else step + self.lag
    if not at_start and self.versions.max_built >= first_batch:
      first_batch = self.versions.max_built + 1
      log.warning("hard negatives: the pipeline read past the lookahead (%d); the table "
                  "mined at step %d applies from batch %d", self.lag, step, first_batch)
    version = Version(first_batch, step, step + interval, table)
    self.versions.install(version)
    save_version(self.directory, version)
    self.next_step = version.next_step
    self._trained_since = time.monotonic()
    finite = scores[np.isfinite(scores)]
    metrics = {"mine_seconds": seconds, "embed_seconds": embed_seconds, "mean_score": float(finite.mean()) if finite.size else 0.0,
               "first_batch": first_batch, "next_step": version.next_step}
    return metrics, note

  def mine_and_log(self, ctx: hooks.Context, params, step: int, *, at_start: bool) -> None:
    """One mining, its metrics written as kind 'hard_negatives' (a postponement said)."""
    recall = tuple(ctx.views["recall"])
    modality = "m" if "m" in recall else recall[0]
    metrics, note = self.mine(ctx.model, params, step, at_start=at_start, modality=modality,
                              batch_sharding=ctx.batch_sharding)
    ctx.writer.write(step, metrics, kind="hard_negatives")
    if note:
      log.info(note)
      ctx.writer.say(note)


def from_config(config, workdir, data_dir, batch_size: int, source=None) -> Miner:
  """The run's miner over its training source, or over `source` when given (local
  workdirs, one process)."""
  if jax.process_count() != 1:
    raise ConfigError("train.hard_negatives.enabled", "mining runs in one process for now; "
                      f"this run has {jax.process_count()}")
  if "://" in str(workdir):
    raise ConfigError("train.hard_negatives.enabled", "needs a local workdir (the mined "
                      f"tables are files under it), got {workdir}")
  if source is None:
    source = pipeline.open_source(config, "train", data_dir)
  return Miner(config, pathlib.Path(str(workdir)) / "hard_negatives", source,
               pipeline.load_tokenizer(config, data_dir), batch_size)
