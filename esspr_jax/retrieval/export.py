"""Catalog export: embeddings + ids as per-process .npy shards, then one index per modality.

Entry points:

    export_catalog(config, workdir, catalog_csv, image_dir, out_dir, *, checkpoint=None,
                   step=None) -> manifest dict          (main.py --mode=export)
        Restores the model from the run's checkpoint (or `checkpoint`), reads the
        catalog (listing_id, title, image, supplier_id, cate_name, ...) and calls:

    export_embeddings(model, params, items, out_dir, config, *, tokenizer, listings=None,
                      checkpoint_info=None, batch_sharding=None) -> manifest dict
        `items`: a sequence of {'id', 'title', 'image' bytes} (pipeline.CatalogItems);
        `listings`: {listing_id: catalog.Listing} for titles/suppliers/categories;
        `image_dir`: where relative image paths live (recorded absolute for search pages).

Layout of out_dir (`manifest.json` is written last, so its presence means complete):
    manifest.json            model checkpoint + step, model config and its hash,
                             modalities, dtype, count, dim, shard files, index reports
    tokenizer.json           the tokenizer used, so search encodes text the same way
    listings.parquet         listing_id, title, supplier_id, category, image (row order)
    ids.process-PPPPP-of-NNNNN.npy, emb_<m>.process-PPPPP-of-NNNNN.npy   one per process
    index/<m>/               exact or tuned ScaNN index (index.py), rows = shard order

Resumable: each process embeds its share (items p, p+P, ...) in chunks of
`eval.export.chunk_rows`; a chunk's files are written atomically, then a progress
record (`work/progress.process-P.json`) is advanced. After a kill the rerun skips the
recorded chunks and overwrites any unrecorded partial one, so no id is duplicated or
lost. A partial export made with other settings is refused rather than mixed in.
Memory is bounded by one chunk (images are decoded per batch by the loader).
"""
import json
import logging
import math
import os
import pathlib
import shutil
import time
from typing import Mapping, Sequence

import numpy as np

from esspr_jax.config import eval as eval_config
from esspr_jax.errors import DataError
from esspr_jax.retrieval import embed as embed_lib
from esspr_jax.retrieval import index as index_lib
from esspr_jax.retrieval import report as report_lib
from esspr_jax.retrieval import restore

log = logging.getLogger(__name__)

FORMAT = "esspr-export/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
LISTINGS = "listings.parquet"


def shard_name(kind: str, process: int, count: int) -> str:
  return f"{kind}.process-{process:05d}-of-{count:05d}.npy"


class _Share(Sequence):
  """Rows start, start+step, ... of `items` from position `skip` on (lazy)."""

  def __init__(self, items: Sequence, start: int, step: int, skip: int = 0):
    self._items, self._start, self._step, self._skip = items, start, step, skip
    self._len = max(0, math.ceil((len(items) - start) / step) - skip)

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    if not 0 <= i < self._len:
      raise IndexError(i)
    return self._items[self._start + (self._skip + i) * self._step]


def _save_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  tmp = path.with_name(path.name + ".tmp.npy")
  np.save(tmp, array)
  os.replace(tmp, path)


def _fingerprint(config, modalities, dtype, count, process, processes, checkpoint_info) -> dict:
  return {"format": FORMAT, "modalities": list(modalities), "dtype": dtype, "items": count,
          "process": process, "processes": processes, "chunk_rows": config.eval.export.chunk_rows,
          "batch_size": config.eval.batch_size, "model_config_hash": restore.config_hash(config.model),
          "checkpoint": (checkpoint_info or {}).get("checkpoint"),
          "step": (checkpoint_info or {}).get("step")}


def _read_progress(path: pathlib.Path, fingerprint: dict) -> int:
  if not path.is_file():
    return 0
  record = json.loads(path.read_text())
  if record.get("fingerprint") != fingerprint:
    changed = sorted(k for k in fingerprint if record.get("fingerprint", {}).get(k) != fingerprint[k])
    raise DataError(f"{path.parent.parent} holds a partial export made with other settings "
                    f"(differs in {changed}); use a new out_dir or delete that one")
  return int(record["chunks_done"])


def _embed_share(model, params, share, work: pathlib.Path, config, *, tokenizer, modalities,
                 dtype, fingerprint, batch_sharding, process) -> int:
  """Embeds this process's share chunk by chunk; returns the number of chunks."""
  from esspr_jax.input import pipeline  # noqa: PLC0415
  batch = config.eval.batch_size
  chunk_rows = math.ceil(config.eval.export.chunk_rows / batch) * batch
  chunks = math.ceil(len(share) / chunk_rows)
  progress = work / f"progress.process-{process:05d}.json"
  done = _read_progress(progress, fingerprint)
  if done:
    log.info("export: resuming at chunk %d of %d", done, chunks)
  spec = pipeline.spec_from_config(config)
  for c in range(done, chunks):
    part = _Head(_Share(share, 0, 1, c * chunk_rows), min(chunk_rows, len(share) - c * chunk_rows))
    loader = pipeline.make_items_dataset(part, tokenizer, spec, batch, process_index=0,
                                         process_count=1)
    ids, emb = embed_lib.embed_all(model, params, loader, ("item",), modalities,
                                   batch_sharding=batch_sharding)
    if len(ids["item"]) != len(part):
      raise DataError(f"export chunk {c}: the loader gave {len(ids['item'])} rows for "
                      f"{len(part)} items")
    _save_npy_atomic(work / f"chunk-{process:05d}-{c:06d}.ids.npy", ids["item"].astype(str))
    for m in modalities:
      _save_npy_atomic(work / f"chunk-{process:05d}-{c:06d}.{m}.npy", emb["item"][m].astype(dtype))
    report_lib.atomic_write(progress, json.dumps({"fingerprint": fingerprint, "chunks_done": c + 1,
                                                  "chunks": chunks}))
    log.info("export: chunk %d/%d (%d rows)", c + 1, chunks, len(part))
  return chunks


class _Head(Sequence):
  def __init__(self, items, n):
    self._items, self._n = items, n

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._items[i]


def _finalize_shard(work: pathlib.Path, out_dir: pathlib.Path, chunks: int, process: int,
                    processes: int, modalities, dtype) -> None:
  """Concatenates the chunk files into this process's shard files (streaming)."""
  def chunk(c, kind):
    return np.load(work / f"chunk-{process:05d}-{c:06d}.{kind}.npy", mmap_mode="r")

  counts = [len(chunk(c, "ids")) for c in range(chunks)]
  total = sum(counts)
  width = max([chunk(c, "ids").dtype.itemsize // 4 for c in range(chunks)] or [1])
  ids = np.concatenate([chunk(c, "ids") for c in range(chunks)]).astype(f"<U{width}") if chunks \
      else np.zeros(0, "<U1")
  _save_npy_atomic(out_dir / shard_name("ids", process, processes), ids)
  for m in modalities:
    dim = chunk(0, m).shape[1] if chunks else 0
    final = out_dir / shard_name(f"emb_{m}", process, processes)
    tmp = final.with_name(final.name + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total, dim))
    row = 0
    for c in range(chunks):
      part = chunk(c, m)
      out[row:row + len(part)] = part
      row += len(part)
    out.flush()
    del out
    os.replace(tmp, final)


def _image_ref(ref: str, image_dir) -> str:
  """An absolute path (or the URL) of a catalog image, so search pages can show it."""
  if not ref or "://" in ref or image_dir is None:
    return ref
  from esspr_jax.input import images  # noqa: PLC0415
  try:
    return str(images.resolve_image_path(image_dir, ref).absolute())
  except images.BadImage:
    return ref


def _write_listings(path: pathlib.Path, ids: np.ndarray, listings: Mapping | None,
                    image_dir=None) -> None:
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415
  listings = listings or {}

  def get(i, k):
    value = getattr(listings[i], k, "") if i in listings else ""
    return _image_ref(value, image_dir) if k == "image" else value

  table = pa.table({
      "listing_id": [str(i) for i in ids],
      "title": [get(i, "title") for i in ids],
      "supplier_id": [get(i, "supplier_id") for i in ids],
      "category": [get(i, "cate_name") for i in ids],
      "image": [get(i, "image") for i in ids],
  })
  tmp = path.with_name(path.name + ".tmp")
  pq.write_table(table, tmp)
  os.replace(tmp, path)


def load_shards(out_dir, kind: str, processes: int) -> np.ndarray:
  """All processes' shards of `kind` ('ids' or 'emb_<m>') concatenated in process order."""
  out_dir = pathlib.Path(out_dir)
  parts = []
  for p in range(processes):
    path = out_dir / shard_name(kind, p, processes)
    if not path.is_file():
      raise DataError(f"export {out_dir} lacks shard {path.name}")
    parts.append(np.load(path, mmap_mode="r"))
  return np.concatenate(parts) if parts else np.zeros(0)


def export_embeddings(model, params, items: Sequence[dict], out_dir, config, *, tokenizer,
                      listings: Mapping | None = None, checkpoint_info: dict | None = None,
                      image_dir=None, batch_sharding=None,
                      process: tuple[int, int] | None = None) -> dict:
  """See module doc. Returns the manifest (also written to out_dir/manifest.json).

  `process` = (index, count) overrides jax.process_index()/process_count(), e.g. to
  export a share per machine without jax.distributed; then run index 0 last, as it
  builds the indexes from all shards.
  """
  import jax  # noqa: PLC0415
  start = time.perf_counter()
  ex = config.eval.export
  modalities = eval_config.parse_modalities(ex.modalities, "eval.export.modalities")
  missing = [m for m in modalities if m not in getattr(model, "available", modalities)]
  if missing:
    raise DataError(f"eval.export.modalities asks for {missing}, which this model does not "
                    f"produce (it has {tuple(model.available)})")
  if len(items) == 0:
    raise DataError("the catalog to export is empty")
  dtype = np.dtype(ex.dtype)
  out_dir = pathlib.Path(out_dir)
  work = out_dir / "work"
  work.mkdir(parents=True, exist_ok=True)
  (out_dir / MANIFEST).unlink(missing_ok=True)  # an export being (re)made is not complete
  process, processes = process or (jax.process_index(), jax.process_count())
  fingerprint = _fingerprint(config, modalities, dtype.name, len(items), process, processes,
                             checkpoint_info)
  share = _Share(items, process, processes)
  chunks = _embed_share(model, params, share, work, config, tokenizer=tokenizer,
                        modalities=modalities, dtype=dtype, fingerprint=fingerprint,
                        batch_sharding=batch_sharding, process=process)
  _finalize_shard(work, out_dir, chunks, process, processes, modalities, dtype)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("esspr export shards written")
  if process != 0:
    return {}

  ids = load_shards(out_dir, "ids", processes)
  if len(set(ids.tolist())) != len(ids):
    raise DataError(f"export {out_dir}: duplicate listing ids in the catalog")
  tokenizer.save(out_dir / TOKENIZER)
  _write_listings(out_dir / LISTINGS, ids, listings, image_dir)
  indexes = {}
  for m in modalities:
    vectors = np.asarray(load_shards(out_dir, f"emb_{m}", processes), np.float32)
    idx, report = index_lib.build_index(vectors, config.eval.index)
    index_lib.save_index(idx, out_dir / "index" / m)
    indexes[m] = {"dir": f"index/{m}", **report}
    dim = int(vectors.shape[1])
    del idx, vectors
  manifest = {
      "format": FORMAT, "count": int(len(ids)), "dim": dim, "modalities": list(modalities),
      "dtype": dtype.name, "processes": processes,
      "shards": {"ids": [shard_name("ids", p, processes) for p in range(processes)],
                 **{m: [shard_name(f"emb_{m}", p, processes) for p in range(processes)]
                    for m in modalities}},
      "checkpoint": (checkpoint_info or {}).get("checkpoint"),
      "step": (checkpoint_info or {}).get("step"),
      "model_config_hash": restore.config_hash(config.model),
      "model_config": config.model.to_dict(),
      "tokenizer": TOKENIZER, "listings": LISTINGS, "index": indexes,
      "seconds": time.perf_counter() - start,
  }
  report_lib.atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=2, default=str))
  shutil.rmtree(work, ignore_errors=True)
  log.info("export: %d listings x %s -> %s", len(ids), modalities, out_dir)
  return manifest


def export_catalog(config, workdir, catalog_csv, image_dir, out_dir, *, checkpoint=None,
                   step=None, data_dir=None) -> dict:
  """main.py --mode=export: restore the model, export the catalog at `catalog_csv`."""
  from esspr_jax.ingest import catalog as catalog_lib  # noqa: PLC0415
  from esspr_jax.input import pipeline  # noqa: PLC0415
  model, params, info = restore.load_model_and_params(config, checkpoint or workdir, step=step)
  if data_dir is None and not config.data.pipeline.data_dir:
    data_dir = pathlib.Path(workdir) / "tfds"
  tokenizer = pipeline.tokenizer_from_config(config, data_dir)
  listings = catalog_lib.read_catalog(str(catalog_csv))
  items = pipeline.CatalogItems(catalog_csv, image_dir,
                                max_image_side=config.data.pipeline.build.max_image_side or None)
  manifest = export_embeddings(model, params, items, out_dir, config, tokenizer=tokenizer,
                               listings=listings, checkpoint_info=info, image_dir=image_dir)
  if manifest:
    kinds = ", ".join(
        f"{m}: {r['kind']}" + (f" (recall@20 {r['recall']:.4f})" if r["kind"] == "scann" else "")
        for m, r in manifest["index"].items())
    print(f"exported {manifest['count']} listings x {manifest['modalities']} "
          f"({manifest['dim']}-d {manifest['dtype']}) from step {manifest['step']} to {out_dir} "
          f"in {manifest['seconds']:.1f}s; indexes {kinds}", flush=True)
  return manifest
