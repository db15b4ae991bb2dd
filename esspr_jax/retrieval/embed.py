"""Embedding loader batches with a model: one jitted call per batch, padding dropped after.

    for out in embed_batches(model, params, batches, sides=('trigger', 'recall'),
                             modalities=('i', 't', 'm')):
      out.ids['trigger'], out.embeddings['trigger']['m']   # only rows with valid=True

Batches follow docs/architecture.md; each side is fed to `model.apply` as is. The
`valid` mask is applied *after* the jitted call, so every batch has the same shape and
the function compiles once (the padded last batch is embedded, then its padding rows
dropped). With `batch_sharding` (a NamedSharding of the leading dim, e.g. the trainer's
`sharding.batch_sharding`) each process passes its local rows, the call runs sharded
over the mesh, and each process gets back its own rows. Params may already be sharded.
"""
import dataclasses
import functools
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from esspr_jax import sharding
from esspr_jax.errors import DataError

_HOST_ONLY = ("trigger_id", "recall_id", "listing_id", "valid")
ID_KEYS = {"trigger": "trigger_id", "recall": "recall_id", "item": "listing_id"}


@dataclasses.dataclass
class EmbeddedBatch:
  ids: dict            # side -> np.ndarray[str] of the valid rows (empty strings if no ids)
  embeddings: dict     # side -> {modality: float32 [n_valid, E]}


@functools.lru_cache(maxsize=32)
def make_embed_fn(model, modalities: tuple[str, ...]):
  """A jitted fn(params, side) -> {modality: [B, E]} (cached per model and modalities)."""

  def embed(params, side):
    return model.apply({"params": params}, side, train=False, modalities=modalities)

  return jax.jit(embed)


def _model_side(side: dict) -> dict:
  return {k: v for k, v in side.items() if not isinstance(v, np.ndarray) or v.dtype != object}


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order (replicas deduplicated)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  pieces = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    pieces.setdefault(start, shard.data)
  return np.concatenate([np.asarray(pieces[s]) for s in sorted(pieces)])


def embed_batches(model, params, batches: Iterable[dict], sides: Sequence[str],
                  modalities: Sequence[str], *, batch_sharding=None) -> Iterator[EmbeddedBatch]:
  """Yields the valid rows' ids and embeddings of each batch (see module doc)."""
  modalities = tuple(modalities)
  available = getattr(model, "available", modalities)
  missing = [m for m in modalities if m not in available]
  if missing:
    raise DataError(f"the model has no {missing} embeddings (it has {tuple(available)}); "
                    f"a text-only model cannot serve image or fused settings")
  fn = make_embed_fn(model, modalities)
  for batch in batches:
    if "valid" not in batch:
      raise DataError(f"batch lacks the 'valid' mask; it has {sorted(batch)}")
    valid = np.asarray(batch["valid"], bool)
    ids, embeddings = {}, {}
    for side_name in sides:
      if side_name not in batch:
        raise DataError(f"batch lacks side {side_name!r}; it has {sorted(batch)}")
      side = _model_side(batch[side_name])
      if batch_sharding is not None:
        side = sharding.global_batch(side, batch_sharding)
      out = fn(params, side)
      embeddings[side_name] = {m: _local_rows(out[m]).astype(np.float32)[valid] for m in modalities}
      key = ID_KEYS.get(side_name)
      if key in batch:
        ids[side_name] = np.asarray([str(i) for i in np.asarray(batch[key])[valid]])
      else:
        ids[side_name] = np.full(int(valid.sum()), "", dtype=object).astype(str)
    yield EmbeddedBatch(ids, embeddings)


def embed_all(model, params, batches: Iterable[dict], sides: Sequence[str],
              modalities: Sequence[str], *, batch_sharding=None):
  """All valid rows concatenated: (ids {side: [N]}, embeddings {side: {m: [N, E]}})."""
  ids = {s: [] for s in sides}
  emb = {s: {m: [] for m in modalities} for s in sides}
  for out in embed_batches(model, params, batches, sides, modalities,
                           batch_sharding=batch_sharding):
    for s in sides:
      ids[s].append(out.ids[s])
      for m in modalities:
        emb[s][m].append(out.embeddings[s][m])
  if not ids[sides[0]]:
    raise DataError("the loader yielded no batches")
  return ({s: np.concatenate(v) for s, v in ids.items()},
          {s: {m: np.concatenate(v) for m, v in d.items()} for s, d in emb.items()})


def allgather_rows(ids: np.ndarray, vectors: dict) -> tuple[np.ndarray, dict]:
  """Every process's rows on every process (no-op with one process).

  Row counts may differ per process; ids travel as fixed-width UTF-8 bytes.
  """
  if jax.process_count() == 1:
    return ids, vectors
  counts = multihost_utils.process_allgather(np.array([len(ids)]))
  width = int(multihost_utils.process_allgather(
      np.array([max([len(i.encode()) for i in ids] or [1])])).max())
  rows = int(counts.max())
  raw = np.zeros((rows, width), np.uint8)
  for r, i in enumerate(ids):
    b = i.encode()
    raw[r, :len(b)] = np.frombuffer(b, np.uint8)
  all_raw = multihost_utils.process_allgather(raw)
  keep = np.concatenate([np.arange(c) + p * rows for p, c in enumerate(counts.ravel())])
  all_ids = np.asarray([bytes(r).rstrip(b"\0").decode() for r in all_raw.reshape(-1, width)[keep]])
  out = {}
  for m, v in vectors.items():
    padded = np.zeros((rows,) + v.shape[1:], v.dtype)
    padded[:len(v)] = v
    out[m] = multihost_utils.process_allgather(padded).reshape((-1,) + v.shape[1:])[keep]
  return all_ids, out
