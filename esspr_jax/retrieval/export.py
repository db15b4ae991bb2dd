"""Catalog export: embeddings + ids as per-process shards, then one index per modality.

Entry points:

    export_catalog(config, workdir, catalog_csv, image_dir, out_dir, *, checkpoint=None,
                   step=None, update=False) -> manifest dict   (esspr-jax --mode=export [--update])
    export_embeddings(model, params, items, out_dir, config, *, tokenizer, listings=None,
                      checkpoint_info=None, image_dir=None, ...) -> manifest dict
        `items`: a sequence of {'id', 'title', 'image' bytes} (pipeline.CatalogItems);
        `listings`: {listing_id: catalog.Listing} for titles/suppliers/categories.
    export_vectors(chunks, out_dir, config, *, build_indexes=True) -> manifest dict
        The same writer fed with ready vectors (benchmarks; other embedders).
    build_indexes(out_dir, config) -> manifest dict      (indexes for a finished export)

Layout of out_dir (`manifest.json` is written last, so its presence means complete):
    .esspr-export            the marker: this directory is an export's (see claim_dir)
    manifest.json            model checkpoint + step, model config and its hash, modalities,
                             dtype, count, dim, shard files, index reports, and the sha256
                             of every other file (integrity.py: checked before loading)
    tokenizer.json           the tokenizer used, so search encodes text the same way
    ids / hash / emb_<m> .process-PPPPP-of-NNNNN.npy     one per process (row order)
    listings.process-PPPPP-of-NNNNN.parquet             listing_id, title, supplier_id,
                                                        category, image
    index/<m>/               exact or tuned ScaNN index (index.py), rows = shard order
    delta/gen-NNNNNN/        listings added or changed since (update.py), if any

`hash` is each listing's content hash (id, title, image bytes, supplier, category,
image path): updates re-embed only listings whose hash changed.

Resumable: each process embeds its share (items p, p+P, ...) in chunks of
`eval.export.chunk_rows`; a chunk's files are written atomically, then a progress
record (`work/progress.process-P.json`) is advanced with the chunk's content hash.
After a kill the rerun re-hashes the finished chunks' listings and keeps only those
whose content is unchanged (a changed or reordered catalog restarts from the first
chunk that differs), so no id is duplicated, lost or mixed from two catalogs. A partial
export made with another model, checkpoint or settings is refused.

An export only writes into a directory that is new, empty, or already an export's (its
marker, or from before the marker a manifest.json or progress record of this format);
anything else, or an export dir holding files an export does not write, is refused
before a file is touched, so nothing is deleted or listed in the manifest that the
export did not write.

Memory is bounded by one chunk: chunk files are streamed into the shards (memory-mapped
.npy, Parquet row groups); only the index build holds a whole modality.
"""
import hashlib
import json
import logging
import math
import pathlib
import re
import shutil
import time
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jax.experimental import multihost_utils

from esspr_jax import atomic_io
from esspr_jax import workdir as workdir_lib
from esspr_jax.config import eval as eval_config
from esspr_jax.errors import DataError
from esspr_jax.ingest import catalog as catalog_lib
from esspr_jax.input import images
from esspr_jax.input import pipeline, tokenizer_stage
from esspr_jax.retrieval import embed as embed_lib
from esspr_jax.retrieval import index as index_lib
from esspr_jax.retrieval import integrity
from esspr_jax.retrieval import restore

log = logging.getLogger(__name__)

FORMAT = "esspr-export/2"
MANIFEST = integrity.MANIFEST
TOKENIZER = "tokenizer.json"
META_COLUMNS = ("listing_id", "title", "supplier_id", "category", "image")
HASH_BYTES = 16
MARKER = ".esspr-export"
MARKER_TEXT = ("esspr_jax export: this directory is rewritten by --mode=export (index/, delta/, "
               "work/, manifest.json and the shard files)\n")
_SHARD = re.compile(r"^(ids|hash|emb_\w+|listings)\.process-\d{5}-of-\d{5}\.(npy|parquet)$")
_OUR_DIRS = ("index", "delta", "work")


def shard_name(kind: str, process: int, count: int, ext: str = "npy") -> str:
  return f"{kind}.process-{process:05d}-of-{count:05d}.{ext}"


def save_npy(path, array: np.ndarray) -> None:
  with atomic_io.atomic_open(path, "wb") as f:
    np.save(f, array, allow_pickle=False)


def load_npy(path, mmap: bool = True) -> np.ndarray:
  return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def iter_npy(path, rows: int = 65536):
  """An .npy file's rows in slices, by plain reads: unlike a memory map, nothing read
  stays resident, so a pass over a whole shard costs one slice of memory."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise DataError(f"{path}: unsupported .npy version {version}")
    if fortran or dtype.hasobject:
      raise DataError(f"{path}: not a plain C-order array")
    tail = int(np.prod(shape[1:], dtype=np.int64))
    for start in range(0, shape[0], rows):
      n = min(rows, shape[0] - start)
      yield np.fromfile(f, dtype=dtype, count=n * tail).reshape((n,) + tuple(shape[1:]))


# ----------------------------------------------------------------------------- content hashes
def item_hash(item: Mapping, listing=None) -> bytes:
  """The listing's content hash: what the embedding and the search page depend on."""
  h = hashlib.sha256()
  image = item.get("image", b"")
  for part in (str(item["id"]), str(item.get("title", "")),
               getattr(listing, "supplier_id", ""), getattr(listing, "cate_name", ""),
               getattr(listing, "image", "")):
    data = part.encode("utf-8")
    h.update(len(data).to_bytes(8, "little") + data)
  image = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else str(image).encode()
  h.update(len(image).to_bytes(8, "little") + image)
  return h.digest()[:HASH_BYTES]


def hashes_array(digests: Sequence[bytes]) -> np.ndarray:
  return np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), HASH_BYTES)


def _image_ref(ref: str, image_dir) -> str:
  """An absolute path (or the URL) of a catalog image, so search pages can show it."""
  if not ref or "://" in ref or image_dir is None:
    return ref
  try:
    return str(images.resolve_image_path(image_dir, ref).absolute())
  except images.BadImage:
    return ref


def meta_rows(items: Sequence[Mapping], listings: Mapping | None, image_dir=None) -> dict:
  """The listings columns for `items` (title from the catalog, else the item's)."""
  listings = listings or {}
  cols = {c: [] for c in META_COLUMNS}
  for it in items:
    i = str(it["id"])
    x = listings.get(i)
    cols["listing_id"].append(i)
    cols["title"].append(getattr(x, "title", None) or str(it.get("title", "")))
    cols["supplier_id"].append(getattr(x, "supplier_id", ""))
    cols["category"].append(getattr(x, "cate_name", ""))
    cols["image"].append(_image_ref(getattr(x, "image", ""), image_dir))
  return cols


def write_parquet(path, columns: Mapping[str, list]) -> None:
  with atomic_io.atomic_open(path, "wb") as f:
    pq.write_table(pa.table({c: [str(v) for v in columns[c]] for c in META_COLUMNS}), f)


def read_parquet(path) -> dict:
  table = pq.read_table(path).to_pydict()
  return {c: np.asarray(table[c], dtype=object) for c in META_COLUMNS}


# ----------------------------------------------------------------------------- the writer
class ShareWriter:
  """One process's share: chunk files in work/, then streamed into its shard files."""

  def __init__(self, out_dir, process: int, processes: int, modalities, dtype):
    self.out = pathlib.Path(out_dir)
    self.work = self.out / "work"
    self.work.mkdir(parents=True, exist_ok=True)
    self.process, self.processes = process, processes
    self.modalities, self.dtype = tuple(modalities), np.dtype(dtype)

  def _chunk(self, c: int, kind: str, ext: str = "npy") -> pathlib.Path:
    return self.work / f"chunk-{self.process:05d}-{c:06d}.{kind}.{ext}"

  def write_chunk(self, c: int, ids, hashes: np.ndarray, vectors: Mapping, meta: Mapping) -> None:
    n = len(ids)
    if hashes.shape != (n, HASH_BYTES) or any(len(vectors[m]) != n for m in self.modalities):
      raise DataError(f"export chunk {c}: ids, hashes and vectors disagree in length")
    save_npy(self._chunk(c, "ids"), np.asarray([str(i) for i in ids]))
    save_npy(self._chunk(c, "hash"), hashes)
    for m in self.modalities:
      save_npy(self._chunk(c, m), np.asarray(vectors[m]).astype(self.dtype))
    write_parquet(self._chunk(c, "meta", "parquet"), meta)

  def finalize(self, chunks: int) -> list[str]:
    """Shard files of this process (streaming, one chunk in memory); returns their names."""
    counts = [len(load_npy(self._chunk(c, "ids"))) for c in range(chunks)]
    total = sum(counts)
    width = max([load_npy(self._chunk(c, "ids")).dtype.itemsize // 4 for c in range(chunks)] or [1])
    names = []

    def stream(kind, dtype, shape_tail):
      name = shard_name(kind, self.process, self.processes)
      with atomic_io.atomic_open(self.out / name, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": (total,) + shape_tail}
        np.lib.format.write_array_header_1_0(f, header)
        for c in range(chunks):
          part = np.ascontiguousarray(load_npy(self._chunk(c, kind.removeprefix("emb_"))), dtype)
          f.write(part.tobytes())
      names.append(name)

    stream("ids", f"<U{width}", ())
    stream("hash", np.uint8, (HASH_BYTES,))
    for m in self.modalities:
      dim = load_npy(self._chunk(0, m)).shape[1] if chunks else 0
      stream(f"emb_{m}", self.dtype, (dim,))
    name = shard_name("listings", self.process, self.processes, "parquet")
    writer = None
    with atomic_io.atomic_open(self.out / name, "wb") as f:
      for c in range(chunks):
        table = pq.read_table(self._chunk(c, "meta", "parquet"))
        writer = writer or pq.ParquetWriter(f, table.schema)
        writer.write_table(table)
      if writer is None:
        pq.write_table(pa.table({c: pa.array([], pa.string()) for c in META_COLUMNS}), f)
      else:
        writer.close()
    names.append(name)
    return names


def load_shards(out_dir, kind: str, processes: int) -> np.ndarray:
  """All processes' shards of `kind` ('ids', 'hash' or 'emb_<m>') in process order."""
  out_dir = pathlib.Path(out_dir)
  parts = []
  for p in range(processes):
    path = out_dir / shard_name(kind, p, processes)
    if not path.is_file():
      raise DataError(f"export {out_dir} lacks shard {path.name}")
    parts.append(load_npy(path))
  if len(parts) == 1:
    return parts[0]
  return np.concatenate(parts) if parts else np.zeros(0)


def load_listings(out_dir, processes: int) -> dict:
  parts = [read_parquet(pathlib.Path(out_dir) / shard_name("listings", p, processes, "parquet"))
           for p in range(processes)]
  return {c: np.concatenate([p[c] for p in parts]) for c in META_COLUMNS}


def _id_keys(ids: np.ndarray) -> np.ndarray:
  """64-bit FNV-1a keys of fixed-width unicode ids (vectorised over rows; the padding
  of narrower shards is skipped, so a key does not depend on the shard's width)."""
  width = max(ids.dtype.itemsize // 4, 1)
  codes = np.ascontiguousarray(ids).view(np.uint32).reshape(len(ids), width).astype(np.uint64)
  h = np.full(len(ids), 1469598103934665603, np.uint64)
  with np.errstate(over="ignore"):
    for col in range(width):
      c = codes[:, col]
      h = np.where(c != 0, (h ^ c) * np.uint64(1099511628211), h)
  return h


def _check_unique_ids(out_dir, processes: int) -> None:
  """Duplicate ids across shards in 8 bytes per row: 64-bit keys sorted in place, and
  an exact comparison of the ids behind any equal keys."""
  paths = [pathlib.Path(out_dir) / shard_name("ids", p, processes) for p in range(processes)]
  keys = np.concatenate([_id_keys(part) for path in paths for part in iter_npy(path)] or
                        [np.zeros(0, np.uint64)])
  keys.sort()
  clash = np.unique(keys[1:][keys[1:] == keys[:-1]])
  if len(clash):
    found = {}
    for path in paths:
      for part in iter_npy(path):
        for i in part[np.isin(_id_keys(part), clash)].tolist():
          found[i] = found.get(i, 0) + 1
    dup = sorted(i for i, c in found.items() if c > 1)
    if dup:
      raise DataError(f"export {out_dir}: duplicate listing ids {dup[:5]} in the catalog")


# ----------------------------------------------------------------------------- the directory
def _ours(name: str) -> bool:
  """A top-level name an export writes (atomic_io's temporaries of those included)."""
  name = re.sub(r"\.[^.]+\.tmp$", "", name)
  return name in (MANIFEST, MARKER, TOKENIZER, *_OUR_DIRS) or bool(_SHARD.match(name))


def _from_before_the_marker(out_dir: pathlib.Path) -> bool:
  """An export (or an interrupted one) made before exports wrote MARKER."""
  for path in [out_dir / MANIFEST, *sorted((out_dir / "work").glob("progress.process-*.json"))]:
    try:
      record = json.loads(path.read_text())
    except (OSError, ValueError):
      continue
    if isinstance(record, dict):
      fmt = record.get("format") or (record.get("fingerprint") or {}).get("format")
      if isinstance(fmt, str) and fmt.startswith("esspr-export/"):
        return True
  return False


def check_out_dir(out_dir) -> pathlib.Path:
  """Refuses an out_dir an export must not write into (see module doc); writes nothing."""
  out_dir = pathlib.Path(out_dir)
  if not out_dir.exists():
    return out_dir
  if not out_dir.is_dir():
    raise DataError(f"export dir {out_dir} is not a directory")
  # (another process of a multi-process export may be writing the marker right now)
  names = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(MARKER + "."))
  if not names:
    return out_dir
  if not (out_dir / MARKER).is_file() and not _from_before_the_marker(out_dir):
    raise DataError(f"export dir {out_dir} is not empty and is not an export (no {MARKER}); an "
                    f"export replaces index/, delta/, work/ and manifest.json, so it writes only "
                    f"into a new or empty directory: choose another")
  foreign = [n for n in names if not _ours(n)]
  if foreign:
    raise DataError(f"export dir {out_dir} holds files an export does not write: {foreign[:5]}"
                    f"{' ...' if len(foreign) > 5 else ''}; move them away (they would not be "
                    f"part of the export, and search refuses an export holding unlisted files)")
  return out_dir


def claim_dir(out_dir) -> pathlib.Path:
  """check_out_dir, then creates the directory if need be and writes its marker."""
  out_dir = check_out_dir(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if not (out_dir / MARKER).is_file():
    atomic_io.atomic_write(out_dir / MARKER, MARKER_TEXT)
  return out_dir


# ----------------------------------------------------------------------------- progress
def _fingerprint(config, modalities, dtype, process, processes, checkpoint_info) -> dict:
  return {"format": FORMAT, "modalities": list(modalities), "dtype": dtype,
          "process": process, "processes": processes, "chunk_rows": config.eval.export.chunk_rows,
          "batch_size": config.eval.batch_size, "model_config_hash": restore.config_hash(config.model),
          "checkpoint": (checkpoint_info or {}).get("checkpoint"),
          "step": (checkpoint_info or {}).get("step")}


def _read_progress(path: pathlib.Path, fingerprint: dict) -> list[str]:
  """The content hashes of the finished chunks of a partial export with these settings."""
  if not path.is_file():
    return []
  record = json.loads(path.read_text())
  if record.get("fingerprint") != fingerprint:
    changed = sorted(k for k in fingerprint if record.get("fingerprint", {}).get(k) != fingerprint[k])
    raise DataError(f"{path.parent.parent} holds a partial export made with other settings "
                    f"(differs in {changed}); use a new out_dir or delete that one")
  return list(record.get("chunk_hashes", []))


class _Slice(Sequence):
  """Items start, start+step, ... (a process's share), lazily."""

  def __init__(self, items: Sequence, start: int, step: int):
    self._items, self._start, self._step = items, start, step
    self._len = max(0, math.ceil((len(items) - start) / step))

  def __len__(self):
    return self._len

  def __getitem__(self, i):
    if not 0 <= i < self._len:
      raise IndexError(i)
    return self._items[self._start + i * self._step]


def _chunk_items(share: Sequence, c: int, rows: int, listings) -> tuple[list, np.ndarray, str]:
  """Chunk c's items (read once), their content hashes and the chunk's hash."""
  items = [share[i] for i in range(c * rows, min(len(share), (c + 1) * rows))]
  digests = [item_hash(it, (listings or {}).get(str(it["id"]))) for it in items]
  return items, hashes_array(digests), hashlib.sha256(b"".join(digests)).hexdigest()


def embed_items(model, params, items: Sequence, config, *, tokenizer, modalities,
                batch_sharding=None) -> tuple[np.ndarray, dict]:
  """(ids, {m: float32 [n, E]}) of `items` through the catalog loader, in item order."""
  spec = pipeline.spec_from_config(config)
  loader = pipeline.make_items_dataset(items, tokenizer, spec, config.eval.batch_size,
                                       process_index=0, process_count=1)
  ids, emb = embed_lib.embed_all(model, params, loader, ("item",), modalities,
                                 batch_sharding=batch_sharding)
  if len(ids["item"]) != len(items) or ids["item"].tolist() != [str(it["id"]) for it in items]:
    raise DataError(f"export: the loader gave {len(ids['item'])} rows for {len(items)} items")
  return ids["item"], emb["item"]


def _embed_share(model, params, share, writer: ShareWriter, config, *, tokenizer, listings,
                 image_dir, fingerprint, batch_sharding) -> int:
  """Embeds this process's share chunk by chunk; returns the number of chunks."""
  batch = config.eval.batch_size
  rows = math.ceil(config.eval.export.chunk_rows / batch) * batch
  chunks = math.ceil(len(share) / rows)
  progress = writer.work / f"progress.process-{writer.process:05d}.json"
  done = _read_progress(progress, fingerprint)[:chunks]
  resumed = False
  for c in range(chunks):
    items, hashes, chunk_hash = _chunk_items(share, c, rows, listings)
    if c < len(done):
      if done[c] == chunk_hash:
        continue
      log.warning("export: the catalog changed since the partial export (chunk %d of %d "
                  "differs): re-embedding from there", c, chunks)
      done = done[:c]
    if c and c == len(done) and not resumed:
      log.info("export: resuming at chunk %d of %d", c, chunks)
    resumed = True
    ids, vectors = embed_items(model, params, items, config, tokenizer=tokenizer,
                               modalities=writer.modalities, batch_sharding=batch_sharding)
    writer.write_chunk(c, ids, hashes, vectors, meta_rows(items, listings, image_dir))
    done = done[:c] + [chunk_hash]
    atomic_io.write_json(progress, {"fingerprint": fingerprint, "chunks": chunks,
                                    "chunk_hashes": done}, indent=None)
    log.info("export: chunk %d/%d (%d rows)", c + 1, chunks, len(items))
  return chunks


# ----------------------------------------------------------------------------- finishing
def asset_names(out_dir) -> list[str]:
  return [f for f in integrity.list_files(out_dir) if f != MANIFEST]


def write_manifest(out_dir, manifest: dict) -> dict:
  """Adds the sha256 of every file in out_dir, then writes manifest.json (atomically)."""
  manifest = dict(manifest, assets=integrity.hash_assets(out_dir, asset_names(out_dir)))
  atomic_io.write_json(pathlib.Path(out_dir) / MANIFEST, manifest, sort_keys=False)
  return manifest


def read_manifest(out_dir) -> dict:
  out_dir = pathlib.Path(out_dir)
  path = out_dir / MANIFEST
  if not path.is_file():
    raise DataError(f"{out_dir} is not a finished export (no {MANIFEST}; an interrupted "
                    f"export resumes when rerun)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT or "assets" not in manifest:
    raise integrity.ExportRefused(f"refusing export {out_dir}: format {manifest.get('format')!r} "
                                  f"has no file manifest (want {FORMAT}); re-export it")
  return manifest


def _build_and_save(out_dir: pathlib.Path, config, modalities, processes) -> dict:
  indexes = {}
  for m in modalities:
    vectors = np.asarray(load_shards(out_dir, f"emb_{m}", processes), np.float32)
    idx, report = index_lib.build_index(vectors, config.eval.index)
    index_lib.save_index(idx, out_dir / "index" / m)
    indexes[m] = {"dir": f"index/{m}", **report}
    del idx, vectors
  return indexes


def build_indexes(out_dir, config) -> dict:
  """Builds (or rebuilds) the indexes of a finished export and rewrites its manifest."""
  out_dir = pathlib.Path(out_dir)
  manifest = read_manifest(out_dir)
  integrity.check_layout(out_dir, manifest["assets"])
  start = time.perf_counter()
  manifest["index"] = _build_and_save(out_dir, config, manifest["modalities"], manifest["processes"])
  manifest["index_seconds"] = time.perf_counter() - start
  return write_manifest(out_dir, manifest)


def finish_export(out_dir, config, *, modalities, dtype, processes, checkpoint_info=None,
                  tokenizer=None, build=True, seconds=0.0, extra=None) -> dict:
  """Process 0, after every process's shards: checks, indexes, manifest; drops work/."""
  out_dir = pathlib.Path(out_dir)
  _check_unique_ids(out_dir, processes)
  if tokenizer is not None:
    tokenizer.save(out_dir / TOKENIZER)
  shutil.rmtree(out_dir / "work", ignore_errors=True)
  start = time.perf_counter()
  ids = load_shards(out_dir, "ids", processes)
  first = load_shards(out_dir, f"emb_{modalities[0]}", processes)
  manifest = {
      "format": FORMAT, "count": int(len(ids)), "dim": int(first.shape[1]),
      "modalities": list(modalities), "dtype": np.dtype(dtype).name, "processes": processes,
      "shards": {k: [shard_name(k, p, processes) for p in range(processes)]
                 for k in ("ids", "hash", *[f"emb_{m}" for m in modalities])},
      "listings": [shard_name("listings", p, processes, "parquet") for p in range(processes)],
      "checkpoint": (checkpoint_info or {}).get("checkpoint"),
      "step": (checkpoint_info or {}).get("step"),
      "model_config_hash": restore.config_hash(config.model),
      "model_config": config.model.to_dict(),
      "tokenizer": TOKENIZER if tokenizer is not None else None,
      "index": _build_and_save(out_dir, config, modalities, processes) if build else {},
      "delta": None, **(extra or {}),
  }
  del ids, first
  wanted = {*manifest["listings"], *(n for names in manifest["shards"].values() for n in names)}
  for stale in out_dir.iterdir():
    # Shards of an earlier export with another process count, and temporaries of
    # writers killed in an earlier run (every process has finished writing by now).
    if stale.is_file() and ((_SHARD.match(stale.name) and stale.name not in wanted)
                            or (stale.name.endswith(".tmp") and _ours(stale.name))):
      stale.unlink()
  manifest["index_seconds"] = time.perf_counter() - start
  manifest["seconds"] = seconds + manifest["index_seconds"]
  return write_manifest(out_dir, manifest)


def _start(out_dir, config) -> tuple[pathlib.Path, tuple, np.dtype]:
  ex = config.eval.export
  modalities = eval_config.parse_modalities(ex.modalities, "eval.export.modalities")
  out_dir = claim_dir(out_dir)
  (out_dir / MANIFEST).unlink(missing_ok=True)  # an export being (re)made is not complete
  for stale in ("index", "delta"):
    shutil.rmtree(out_dir / stale, ignore_errors=True)
  return out_dir, modalities, np.dtype(ex.dtype)


def export_embeddings(model, params, items: Sequence[dict], out_dir, config, *, tokenizer,
                      listings: Mapping | None = None, checkpoint_info: dict | None = None,
                      image_dir=None, batch_sharding=None,
                      process: tuple[int, int] | None = None) -> dict:
  """See module doc. Returns the manifest (also written to out_dir/manifest.json).

  `process` = (index, count) overrides jax.process_index()/process_count(), e.g. to
  export a share per machine without jax.distributed; then run index 0 last, as it
  builds the indexes from all shards.
  """
  start = time.perf_counter()
  modalities = eval_config.parse_modalities(config.eval.export.modalities, "eval.export.modalities")
  missing = [m for m in modalities if m not in getattr(model, "available", modalities)]
  if missing:
    raise DataError(f"eval.export.modalities asks for {missing}, which this model does not "
                    f"produce (it has {tuple(model.available)})")
  if len(items) == 0:
    raise DataError("the catalog to export is empty")
  out_dir, modalities, dtype = _start(out_dir, config)
  process, processes = process or (jax.process_index(), jax.process_count())
  writer = ShareWriter(out_dir, process, processes, modalities, dtype)
  fingerprint = _fingerprint(config, modalities, dtype.name, process, processes, checkpoint_info)
  chunks = _embed_share(model, params, _Slice(items, process, processes), writer, config,
                        tokenizer=tokenizer, listings=listings, image_dir=image_dir,
                        fingerprint=fingerprint, batch_sharding=batch_sharding)
  writer.finalize(chunks)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("esspr export shards written")
  if process != 0:
    return {}
  manifest = finish_export(out_dir, config, modalities=modalities, dtype=dtype,
                           processes=processes, checkpoint_info=checkpoint_info,
                           tokenizer=tokenizer, seconds=time.perf_counter() - start)
  log.info("export: %d listings x %s -> %s", manifest["count"], modalities, out_dir)
  return manifest


def export_vectors(chunks: Iterable[tuple], out_dir, config, *, build_indexes: bool = True,
                   checkpoint_info: dict | None = None, tokenizer=None, extra=None) -> dict:
  """Exports ready vectors: `chunks` yields (ids, {m: [n, E]}, meta columns[, hashes]).

  The same writer, shard layout and manifest as export_embeddings (one process).
  Without hashes a row's content hash is taken over its id, title and vector bytes.
  """
  start = time.perf_counter()
  out_dir, modalities, dtype = _start(out_dir, config)
  shutil.rmtree(out_dir / "work", ignore_errors=True)
  writer = ShareWriter(out_dir, 0, 1, modalities, dtype)
  count = 0
  for c, chunk in enumerate(chunks):
    ids, vectors, meta = chunk[:3]
    hashes = chunk[3] if len(chunk) > 3 else hashes_array([
        item_hash({"id": i, "title": meta["title"][r],
                   "image": b"".join(np.asarray(vectors[m][r]).tobytes() for m in modalities)})
        for r, i in enumerate(ids)])
    writer.write_chunk(c, ids, np.asarray(hashes, np.uint8), vectors, meta)
    count = c + 1
  if not count:
    raise DataError("export_vectors: no chunks to export")
  writer.finalize(count)
  return finish_export(out_dir, config, modalities=modalities, dtype=dtype, processes=1,
                       checkpoint_info=checkpoint_info, build=build_indexes, tokenizer=tokenizer,
                       seconds=time.perf_counter() - start, extra=extra)


def export_catalog(config, workdir, catalog_csv, image_dir, out_dir, *, checkpoint=None,
                   step=None, data_dir=None, update: bool = False) -> dict:
  """`esspr-jax --mode=export [--update]`: restore the model, export (or update) the catalog."""
  if not update:
    check_out_dir(out_dir)  # before the model is restored
  model, params, info = restore.load_model_and_params(config, checkpoint or workdir, step=step)
  if data_dir is None:
    data_dir = workdir_lib.default_data_dir(config, workdir)
  tokenizer = tokenizer_stage.load_tokenizer(config, data_dir)
  items, listings = read_catalog(config, catalog_csv, image_dir)
  if update:
    # update.py imports this module (the export/update circle, not broken yet).
    from esspr_jax.retrieval import update as update_lib  # noqa: PLC0415  (see above)
    manifest = update_lib.update_export(model, params, items, out_dir, config,
                                        tokenizer=tokenizer, listings=listings,
                                        checkpoint_info=info, image_dir=image_dir)
  else:
    manifest = export_embeddings(model, params, items, out_dir, config, tokenizer=tokenizer,
                                 listings=listings, checkpoint_info=info, image_dir=image_dir)
  if manifest:
    kinds = ", ".join(
        f"{m}: {r['kind']}" + (f" (recall@20 {r['recall']:.4f})" if r["kind"] == "scann" else "")
        for m, r in manifest["index"].items())
    delta = manifest.get("delta") or {}
    print(f"exported {manifest['count']} listings x {manifest['modalities']} "
          f"({manifest['dim']}-d {manifest['dtype']}) from step {manifest['step']} to {out_dir} "
          f"in {manifest['seconds']:.1f}s; indexes {kinds}"
          + (f"; delta {delta['count']} rows, {delta['dead']} base rows retired"
             if delta else ""), flush=True)
  return manifest


def read_catalog(config, catalog_csv, image_dir):
  """The catalog's items (validated images) and listing metadata: the one call site of
  the catalog readers in export, so the single-reader change lands in one place."""
  listings = catalog_lib.read_catalog(str(catalog_csv))
  items = pipeline.CatalogItems(catalog_csv, image_dir,
                                max_image_side=config.data.pipeline.build.max_image_side or None)
  return items, listings
