"""Index updates without a full rebuild (`--mode=export --update`).

ScaNN cannot insert or delete, and a marketplace catalog changes daily. An updated
export keeps its base (shards + index, untouched) and adds one delta generation:

    delta/gen-NNNNNN/ids.npy, hash.npy, emb_<m>.npy, listings.parquet
                     listings added or changed since the base (their fresh embeddings)
    delta/gen-NNNNNN/retired.npy
                     bool per base row: deleted from the catalog or superseded by a delta row

An update hashes every catalog listing (export.item_hash), embeds only those whose
hash is new, retires base rows that are gone or changed, and writes the next
generation and then the manifest (so a killed update leaves the previous state
valid; its stray files are removed by the next update). The searcher merges the base
index with an exact index over the delta and never returns a retired row
(index.LiveIndex). When the delta plus the retired rows pass
`eval.export.rebuild_fraction` of the live rows, the update folds everything into a
new base instead (vectors reused, not re-embedded) and rebuilds the indexes: built
beside as `<out_dir>.fold-tmp` and exchanged with out_dir in one atomic step
(dir_swap.py), so out_dir is always a whole export; the next update removes a staging
dir a killed fold left.

The model must be the one that made the export (same checkpoint, step, model config):
mixing embeddings of two models in one index would be silently wrong.
"""
import logging
import pathlib
import shutil
import time
from typing import Mapping, Sequence

import numpy as np

from esspr_jax import dir_swap
from esspr_jax.errors import DataError
from esspr_jax.retrieval import export as export_lib
from esspr_jax.retrieval import integrity
from esspr_jax.retrieval import restore

log = logging.getLogger(__name__)

DELTA = "delta"


def load_delta(out_dir, manifest: Mapping) -> dict | None:
  """The current delta generation ({ids, hash, retired, meta, emb_<m>}) or None."""
  d = manifest.get("delta")
  if not d:
    return None
  root = pathlib.Path(out_dir) / d["dir"]
  state = {"ids": export_lib.load_npy(root / "ids.npy", mmap=False).astype(str),
           "hash": export_lib.load_npy(root / "hash.npy", mmap=False),
           "retired": export_lib.load_npy(root / "retired.npy", mmap=False).astype(bool),
           "meta": export_lib.read_parquet(root / "listings.parquet")}
  for m in manifest["modalities"]:
    state[f"emb_{m}"] = export_lib.load_npy(root / f"emb_{m}.npy", mmap=False)
  return state


def _staging(out_dir: pathlib.Path) -> pathlib.Path:
  return out_dir.with_name(out_dir.name + ".fold-tmp")


def _remove_strays(out_dir: pathlib.Path, manifest: Mapping) -> None:
  """What an interrupted update left: generations not the manifest's, and a fold's
  staging dir (a new base not swapped in yet, or the old one swapped out). Called once
  out_dir's manifest has been read, so out_dir is a whole export."""
  if _staging(out_dir).is_dir():
    log.warning("update: removing %s left by an interrupted fold", _staging(out_dir))
    shutil.rmtree(_staging(out_dir), ignore_errors=True)
  keep = (manifest.get("delta") or {}).get("dir")
  for gen in sorted((out_dir / DELTA).glob("*")):
    if gen.relative_to(out_dir).as_posix() != keep:
      log.warning("update: removing %s left by an interrupted update", gen)
      shutil.rmtree(gen, ignore_errors=True) if gen.is_dir() else gen.unlink()


def _check_same_model(manifest, config, checkpoint_info, out_dir) -> None:
  if manifest.get("model_config_hash") != restore.config_hash(config.model):
    restore.check_same_model_config(manifest.get("model_config", {}), config.model,
                                    f"export {out_dir}")
  info = checkpoint_info or {}
  made = (manifest.get("checkpoint"), manifest.get("step"))
  now = (info.get("checkpoint"), info.get("step"))
  if made != now:
    raise DataError(f"export {out_dir} was made with checkpoint {made[0]} step {made[1]}; "
                    f"an update must embed with the same model, not {now[0]} step {now[1]} "
                    f"(its vectors would not be comparable): run a full export instead")
  modalities = ",".join(manifest["modalities"])
  wanted = ",".join(m.strip() for m in config.eval.export.modalities.split(",") if m.strip())
  if wanted != modalities or config.eval.export.dtype != manifest["dtype"]:
    raise DataError(f"export {out_dir} holds modalities {modalities} as {manifest['dtype']}; "
                    f"the config asks for {wanted} as {config.eval.export.dtype}: run a full export")


def plan(base_ids, base_hash, retired, delta, catalog_ids, catalog_hash):
  """What an update does, as row numbers (pure).

  Returns (embed: catalog positions to embed, keep: delta rows kept, retired: new mask,
  removed: count of listings gone from the catalog).
  """
  live = {}
  for r, (i, h) in enumerate(zip(base_ids, base_hash)):
    if not retired[r]:
      live[i] = ("base", r, h.tobytes())
  if delta is not None:
    for r, (i, h) in enumerate(zip(delta["ids"], delta["hash"])):
      live[i] = ("delta", r, h.tobytes())
  retired = retired.copy()
  embed, keep, seen = [], [], set()
  for pos, (i, h) in enumerate(zip(catalog_ids, catalog_hash)):
    seen.add(i)
    where = live.get(i)
    if where is not None and where[2] == h:
      if where[0] == "delta":
        keep.append(where[1])
      continue
    embed.append(pos)
    if where is not None and where[0] == "base":
      retired[where[1]] = True
  removed = 0
  for i, (kind, r, _) in live.items():
    if i not in seen:
      removed += 1
      if kind == "base":
        retired[r] = True
  return embed, sorted(keep), retired, removed


def update_export(model, params, items: Sequence[dict], out_dir, config, *, tokenizer,
                  listings: Mapping | None = None, checkpoint_info: dict | None = None,
                  image_dir=None) -> dict:
  """See module doc. Returns the new manifest. One process (the delta is small)."""
  start = time.perf_counter()
  out_dir = pathlib.Path(out_dir)
  manifest = export_lib.read_manifest(out_dir)
  _remove_strays(out_dir, manifest)
  integrity.check_layout(out_dir, manifest["assets"])
  _check_same_model(manifest, config, checkpoint_info, out_dir)
  processes = manifest["processes"]
  integrity.verify(out_dir, manifest["assets"],
                   manifest["shards"]["ids"] + manifest["shards"]["hash"] + manifest["listings"]
                   + ([manifest["delta"]["dir"]] if manifest.get("delta") else []))
  base_ids = np.asarray(export_lib.load_shards(out_dir, "ids", processes)).astype(str)
  base_hash = np.asarray(export_lib.load_shards(out_dir, "hash", processes))
  delta = load_delta(out_dir, manifest)
  retired = delta["retired"] if delta is not None else np.zeros(len(base_ids), bool)

  listings = listings or {}
  catalog_ids, catalog_hash = [], []
  for pos in range(len(items)):
    it = items[pos]
    catalog_ids.append(str(it["id"]))
    catalog_hash.append(export_lib.item_hash(it, listings.get(str(it["id"]))))
  if len(set(catalog_ids)) != len(catalog_ids):
    raise DataError("update: duplicate listing ids in the catalog")
  embed, keep, retired, removed = plan(base_ids, base_hash, retired, delta, catalog_ids,
                                       catalog_hash)
  modalities = tuple(manifest["modalities"])
  dtype = np.dtype(manifest["dtype"])
  new_items = [items[p] for p in embed]
  vectors = {m: np.zeros((0, manifest["dim"]), dtype) for m in modalities}
  if new_items:
    _, fresh = export_lib.embed_items(model, params, new_items, config, tokenizer=tokenizer,
                                      modalities=modalities)
    vectors = {m: fresh[m].astype(dtype) for m in modalities}
  keep_rows = np.asarray(keep, np.int64)
  pick = lambda a: a[keep_rows] if delta is not None else a[:0]
  new = {"ids": np.concatenate([pick(delta["ids"]) if delta else np.zeros(0, "<U1"),
                                np.asarray([catalog_ids[p] for p in embed], dtype=str)]).astype(str),
         "hash": np.concatenate([pick(delta["hash"]) if delta else np.zeros((0, 16), np.uint8),
                                 export_lib.hashes_array([catalog_hash[p] for p in embed])]),
         "retired": retired}
  meta_new = export_lib.meta_rows(new_items, listings, image_dir)
  new["meta"] = {c: list(pick(delta["meta"][c]) if delta else []) + meta_new[c]
                 for c in export_lib.META_COLUMNS}
  for m in modalities:
    new[f"emb_{m}"] = np.concatenate([pick(delta[f"emb_{m}"]) if delta else vectors[m][:0],
                                      vectors[m]]).astype(dtype)
  live = int(len(base_ids) - retired.sum() + len(new["ids"]))
  churn = int(retired.sum() + len(new["ids"]))
  log.info("update: %d embedded (new or changed), %d removed; delta %d rows, %d base rows "
           "retired, %d live", len(embed), removed, len(new["ids"]), int(retired.sum()), live)
  summary = {"embedded": len(embed), "removed": removed}
  if churn > config.eval.export.rebuild_fraction * max(live, 1):
    log.info("update: delta + retired rows (%d) pass eval.export.rebuild_fraction=%.3g of %d "
             "live rows: folding into a new base", churn, config.eval.export.rebuild_fraction, live)
    return _fold(out_dir, manifest, config, base_ids, new, modalities, start, summary)
  return _write_generation(out_dir, manifest, new, modalities, start, summary, live)


def _write_generation(out_dir, manifest, new, modalities, start, summary, live) -> dict:
  generation = int((manifest.get("delta") or {}).get("generation", 0)) + 1
  rel = f"{DELTA}/gen-{generation:06d}"
  root = out_dir / rel
  root.mkdir(parents=True)
  export_lib.save_npy(root / "ids.npy", new["ids"])
  export_lib.save_npy(root / "hash.npy", new["hash"])
  export_lib.save_npy(root / "retired.npy", new["retired"])
  for m in modalities:
    export_lib.save_npy(root / f"emb_{m}.npy", new[f"emb_{m}"])
  export_lib.write_parquet(root / "listings.parquet", new["meta"])
  old = (manifest.get("delta") or {}).get("dir")
  manifest = dict(manifest, count=live, seconds=time.perf_counter() - start, update=summary,
                  delta={"dir": rel, "generation": generation, "count": int(len(new["ids"])),
                         "dead": int(new["retired"].sum())})
  manifest["assets"] = {k: v for k, v in manifest["assets"].items()
                        if not (old and k.startswith(old + "/"))}
  files = [f for f in integrity.list_files(out_dir) if f.startswith(rel + "/")]
  manifest["assets"].update(integrity.hash_assets(out_dir, files))
  export_lib.atomic_io.write_json(out_dir / export_lib.MANIFEST, manifest, sort_keys=False)
  if old:
    shutil.rmtree(out_dir / old, ignore_errors=True)
  return manifest


class _CopyOf:
  """A 'tokenizer' whose save() copies the export's own tokenizer file."""

  def __init__(self, path):
    self.path = path

  def save(self, dst):
    shutil.copyfile(self.path, dst)


def _fold(out_dir, manifest, config, base_ids, new, modalities, start, summary) -> dict:
  """A new base from the live base rows and the delta (vectors reused), then swapped in."""
  processes = manifest["processes"]
  live_rows = np.nonzero(~new["retired"])[0]
  base_meta = export_lib.load_listings(out_dir, processes)
  base_hash = export_lib.load_shards(out_dir, "hash", processes)
  base_emb = {m: export_lib.load_shards(out_dir, f"emb_{m}", processes) for m in modalities}
  rows = config.eval.export.chunk_rows

  def chunks():
    for s in range(0, len(live_rows), rows):
      r = live_rows[s:s + rows]
      yield (base_ids[r], {m: np.asarray(base_emb[m][r]) for m in modalities},
             {c: list(base_meta[c][r]) for c in export_lib.META_COLUMNS}, np.asarray(base_hash[r]))
    for s in range(0, len(new["ids"]), rows):
      sl = slice(s, s + rows)
      yield (new["ids"][sl], {m: new[f"emb_{m}"][sl] for m in modalities},
             {c: list(new["meta"][c][sl]) for c in export_lib.META_COLUMNS}, new["hash"][sl])

  staging = _staging(out_dir)
  shutil.rmtree(staging, ignore_errors=True)
  tokenizer = manifest.get("tokenizer")
  folded = export_lib.export_vectors(
      chunks(), staging, config,
      checkpoint_info={"checkpoint": manifest.get("checkpoint"), "step": manifest.get("step")},
      tokenizer=_CopyOf(out_dir / tokenizer) if tokenizer else None,
      extra={"update": dict(summary, folded=True)})
  dir_swap.swap_in(staging, out_dir)  # one atomic step; the old export then sits at staging
  folded["seconds"] = time.perf_counter() - start
  return folded
