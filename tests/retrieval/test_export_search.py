"""Export round trip (kill + resume gives identical ids and vectors), search API and errors."""
import json
import os
import pathlib
import re
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from esspr_jax.ingest.catalog import Listing
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.input import images
from esspr_jax.retrieval import export, search


class Killed(RuntimeError):
  pass


class FlakyItems(list):
  """A catalog whose reads fail after `budget` items, like a process killed mid-export."""

  def __init__(self, items, budget):
    super().__init__(items)
    self.budget = budget

  def __getitem__(self, i):
    self.budget -= 1
    if self.budget < 0:
      raise Killed("simulated kill")
    return list.__getitem__(self, i)


def catalog(tiny):
  """The sample's 20 listings plus a duplicate listing of item_1 by the same supplier."""
  items, listings = [], {}
  for n, pair in enumerate(tiny.source):
    for side in ("trigger", "recall"):
      s = pair[side]
      items.append(dict(s))
      listings[s["id"]] = Listing(s["id"], f"sup{n % 3}", "lv1", "cat_a" if n % 2 else "cat_b",
                                  s["title"], f"{s['id']}.jpg")
  first = items[0]
  items.append(dict(first, id="item_1_dup"))
  listings["item_1_dup"] = Listing("item_1_dup", listings[first["id"]].supplier_id, "lv1",
                                   listings[first["id"]].cate_name, first["title"], "item_1.jpg")
  return items, listings


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory, shared_data):
  items, listings = catalog(tiny)
  out = tmp_path_factory.mktemp("export") / "full"
  manifest = export.export_embeddings(tiny.model, tiny.params, items, out, tiny.config,
                                      tokenizer=tiny.tokenizer, listings=listings,
                                      checkpoint_info={"checkpoint": None, "step": 5},
                                      image_dir=shared_data / "esspr_sample")
  return out, manifest, items, listings


def test_export_layout_and_manifest(exported, tiny):
  out, manifest, items, _ = exported
  assert manifest["count"] == len(items) == 21
  assert manifest["dim"] == tiny.config.model.embed_dim
  assert manifest["modalities"] == ["i", "t", "m"] and manifest["index"]["m"]["kind"] == "exact"
  saved = json.loads((out / "manifest.json").read_text())
  assert saved["step"] == 5
  on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert sorted(saved["assets"]) == [f for f in on_disk if f != "manifest.json"]
  assert not [f for f in on_disk if f.endswith(".pkl")]
  ids = np.load(out / export.shard_name("ids", 0, 1))
  assert ids.tolist() == [it["id"] for it in items]
  m = np.load(out / export.shard_name("emb_m", 0, 1))
  assert m.dtype == np.float32 and m.shape == (21, manifest["dim"])
  np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-5)
  assert not (out / "work").exists()


def test_export_resumes_after_a_kill_without_duplicates(exported, tiny, tmp_path, monkeypatch):
  out, _, items, listings = exported
  embedded = []
  real_embed = export.embed_items
  monkeypatch.setattr(export, "embed_items",
                      lambda m, p, its, *a, **k: embedded.extend(its) or real_embed(m, p, its, *a, **k))
  run = lambda it, cfg=tiny.config: export.export_embeddings(
      tiny.model, tiny.params, it, tmp_path / "resumed", cfg, tokenizer=tiny.tokenizer,
      listings=listings, checkpoint_info={"checkpoint": None, "step": 5})
  with pytest.raises(Killed):
    run(FlakyItems(items, budget=11))   # chunk 0 (8 rows) finishes, chunk 1 dies
  progress = json.loads((tmp_path / "resumed" / "work" / "progress.process-00000.json").read_text())
  assert len(progress["chunk_hashes"]) == 1 and progress["chunks"] == 3
  assert not (tmp_path / "resumed" / "manifest.json").exists()
  with pytest.raises(DataError, match="not a finished export"):
    search.Searcher(tmp_path / "resumed")
  other = tiny.config.copy_and_resolve_references()
  other.eval.export.dtype = "float16"
  with pytest.raises(DataError, match="other settings.*dtype"):
    run(items, other)
  embedded.clear()
  run(items)
  assert [e["id"] for e in embedded] == [it["id"] for it in items[8:]]  # chunk 0 not redone
  for kind in ("ids", "hash", "emb_i", "emb_t", "emb_m"):
    a = np.load(out / export.shard_name(kind, 0, 1))
    b = np.load(tmp_path / "resumed" / export.shard_name(kind, 0, 1))
    np.testing.assert_array_equal(a, b)


def _by_id(directory, ids):
  """{listing id: row of emb_m} of an export (base shards only)."""
  e = np.load(directory / export.shard_name("emb_m", 0, 1))
  return {i: e[r] for r, i in enumerate(np.load(directory / export.shard_name("ids", 0, 1)).tolist())
          if i in ids}


@pytest.mark.parametrize("change", ["reordered", "replaced"])
def test_resume_with_a_changed_catalog_never_mixes_two_catalogs(exported, tiny, tmp_path, change):
  out, _, items, listings = exported
  if change == "reordered":
    second = items[::-1]
  else:   # 4 listings removed, 4 new ones (other ids, other titles) in their place
    second = items[:-4] + [dict(it, id=f"new_{n}", title=f"new title {n}") for n, it in enumerate(items[:4])]
  run = lambda it: export.export_embeddings(
      tiny.model, tiny.params, it, tmp_path / "e", tiny.config, tokenizer=tiny.tokenizer,
      listings=listings, checkpoint_info={"checkpoint": None, "step": 5})
  with pytest.raises(Killed):
    run(FlakyItems(items, budget=19))   # chunks 0 and 1 of the first catalog finish
  manifest = run(second)                # no false "duplicate listing ids", no mix
  ids = np.load(tmp_path / "e" / export.shard_name("ids", 0, 1)).tolist()
  assert ids == [it["id"] for it in second] and manifest["count"] == len(second)
  meta = export.load_listings(tmp_path / "e", 1)
  assert meta["title"].tolist() == [listings[i].title if i in listings else
                                    next(it["title"] for it in second if it["id"] == i) for i in ids]
  fresh = tmp_path / "fresh"
  export.export_embeddings(tiny.model, tiny.params, second, fresh, tiny.config,
                           tokenizer=tiny.tokenizer, listings=listings,
                           checkpoint_info={"checkpoint": None, "step": 5})
  a, b = _by_id(tmp_path / "e", set(ids)), _by_id(fresh, set(ids))
  for i in ids:
    np.testing.assert_allclose(a[i], b[i], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def searcher(exported, tiny):
  return search.Searcher(exported[0], model=tiny.model, params=tiny.params, config=tiny.config)


def test_by_id_filters_and_scores(searcher):
  hits = searcher.by_id("item_1", k=5)
  assert len(hits) == 5 and "item_1" not in [h.listing_id for h in hits]
  assert hits[0].listing_id == "item_1_dup" and hits[0].score == pytest.approx(1.0, abs=1e-5)
  assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
  vec = searcher.vectors("m")
  for h in hits:
    expected = float(vec[searcher.row("item_1")] @ vec[searcher.row(h.listing_id)])
    assert h.score == pytest.approx(expected, abs=1e-5)
  supplier = hits[0].supplier_id
  more = searcher.by_id("item_1", k=5, more_suppliers=True)
  assert more and all(h.supplier_id != supplier for h in more)
  cat = searcher.by_id("item_1", k=30, category="cat_a")
  assert cat and all(h.category == "cat_a" for h in cat) and len(cat) == 10


def test_duplicates_report_and_interactive_query(searcher, shared_data, tmp_path):
  supplier = searcher.meta["supplier_id"][searcher.row("item_1")]
  pairs = searcher.duplicates(supplier, threshold=0.999)
  rows = np.nonzero(searcher.meta["supplier_id"] == supplier)[0]
  vec = searcher.vectors("m")[rows]
  sim = vec @ vec.T
  expected = {(searcher.ids[rows[a]], searcher.ids[rows[b]])
              for a in range(len(rows)) for b in range(a + 1, len(rows)) if sim[a, b] >= 0.999}
  assert {(a.listing_id, b.listing_id) for a, b, _ in pairs} == expected
  assert (pairs[0][0].listing_id, pairs[0][1].listing_id) == ("item_1", "item_1_dup")
  assert pairs[0][2] == pytest.approx(1.0, abs=1e-5)
  image = shared_data / "esspr_sample" / "item_1.jpg"
  title = searcher.meta["title"][searcher.row("item_1")]
  hits = searcher.by_image_text(image, title, k=3)
  assert {hits[0].listing_id, hits[1].listing_id} == {"item_1", "item_1_dup"}
  assert hits[0].score == pytest.approx(1.0, abs=1e-4)
  page = searcher.write_html(tmp_path / "hits.html", "test", hits, query_image=image,
                             query_text=title)
  text = page.read_text()
  assert text.count('class="card"') == 3 and "item_1.jpg" in text


def test_search_errors_name_the_problem(searcher, exported, tiny, tmp_path):
  with pytest.raises(DataError, match="unknown listing id 'nope'"):
    searcher.by_id("nope")
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(DataError, match="cannot read query image .*broken.jpg"):
    searcher.by_image(bad)
  with pytest.raises(DataError, match="empty query text"):
    searcher.by_text("   ")
  with pytest.raises(DataError, match="unknown supplier"):
    searcher.duplicates("nobody")
  with pytest.raises(DataError, match="need the model"):
    search.Searcher(exported[0]).by_text("mug")
  # An export built without 't', and one whose vectors have another dimension.
  copy = tmp_path / "copy"
  shutil.copytree(exported[0], copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["index"].pop("t")
  manifest["modalities"] = ["i", "m"]
  (copy / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(DataError, match="has no 't' index"):
    search.Searcher(copy).by_id("item_1", gallery="t")
  manifest["dim"] = 64
  (copy / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(DataError, match="embeds in 32 dimensions.*64-dimensional"):
    search.Searcher(copy, model=tiny.model, params=tiny.params, config=tiny.config)
  other = tiny.config.copy_and_resolve_references()
  other.model.embed_dim = 48
  with pytest.raises(ConfigError, match="model.embed_dim.*another model config"):
    search.Searcher(exported[0], model=tiny.model, params=tiny.params, config=other)


def _within(seconds, fn):
  """fn()'s exception, or AssertionError if it does not return within `seconds`."""
  box = {}

  def run():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001
      box["error"] = e
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), "hung reading the query image"
  return box.get("error")


def test_query_images_are_read_like_the_build_regular_and_capped(searcher, tmp_path):
  """A FIFO, a device, a sparse file over the byte cap, bytes over it and a picture over
  the pixel cap: each a DataError naming why, never a hang or a read until memory runs out."""
  os.mkfifo(tmp_path / "pipe.jpg")
  huge = tmp_path / "huge.jpg"
  huge.touch()
  os.truncate(huge, images.MAX_IMAGE_BYTES + 1)
  many_pixels = tmp_path / "144mpx.png"  # 12000 x 12000, 1-bit: a small file
  Image.new("1", (12000, 12000)).save(many_pixels)
  cases = {tmp_path / "pipe.jpg": "a FIFO", pathlib.Path("/dev/zero"): "a device",
           huge: "image_too_large.*bytes", many_pixels: "image_too_large.*pixels",
           b"\xff\xd8" * (images.MAX_IMAGE_BYTES // 2 + 1): "image_too_large.*bytes"}
  for query, why in cases.items():
    error = _within(20, lambda q=query: searcher.by_image(q))
    assert isinstance(error, DataError), (query if isinstance(query, pathlib.Path) else "bytes",
                                          error)
    assert re.search(f"cannot read query image .*{why}", str(error)), str(error)


def test_command_entry_prints_hits_and_duplicates(exported, tiny, capsys, tmp_path):
  out = exported[0]
  hits = search.search_from_config(tiny.config, None, out, listing_id="item_1", k=3,
                                   html_out=str(tmp_path / "p.html"))
  printed = capsys.readouterr().out
  assert len(hits) == 3 and "item_1_dup" in printed and (tmp_path / "p.html").is_file()
  supplier = hits[0].supplier_id
  pairs = search.search_from_config(tiny.config, None, out, supplier=supplier)
  assert ("item_1", "item_1_dup") in [(a.listing_id, b.listing_id) for a, b, _ in pairs]
  with pytest.raises(DataError, match="give a listing id"):
    search.search_from_config(tiny.config, None, out)


def test_two_process_export_covers_every_id_once(exported, tiny, tmp_path):
  out, _, items, listings = exported
  for process in ((1, 2), (0, 2)):   # index 0 last: it builds the indexes from both shards
    manifest = export.export_embeddings(
        tiny.model, tiny.params, items, tmp_path / "two", tiny.config, tokenizer=tiny.tokenizer,
        listings=listings, process=process)
  assert manifest["processes"] == 2 and manifest["count"] == 21
  ids = export.load_shards(tmp_path / "two", "ids", 2)
  assert ids.tolist() == [it["id"] for it in items[0::2]] + [it["id"] for it in items[1::2]]
  one = dict(zip(np.load(out / export.shard_name("ids", 0, 1)).tolist(),
                 np.load(out / export.shard_name("emb_m", 0, 1))))
  two = export.load_shards(tmp_path / "two", "emb_m", 2)
  np.testing.assert_allclose(two, np.stack([one[i] for i in ids.tolist()]), rtol=1e-5, atol=1e-6)
  hits = search.Searcher(tmp_path / "two").by_id("item_1", k=1)
  assert hits[0].listing_id == "item_1_dup"


def test_duplicate_ids_across_shards_of_different_widths_are_found(tmp_path):
  export.save_npy(tmp_path / export.shard_name("ids", 0, 2), np.array([f"L{i}" for i in range(5000)]))
  export.save_npy(tmp_path / export.shard_name("ids", 1, 2), np.array(["M1", "L77"]))
  with pytest.raises(DataError, match=r"duplicate listing ids \['L77'\]"):
    export._check_unique_ids(tmp_path, 2)
  export.save_npy(tmp_path / export.shard_name("ids", 1, 2), np.array(["M1", "L77x"]))
  export._check_unique_ids(tmp_path, 2)
  shard = tmp_path / export.shard_name("ids", 0, 2)
  np.testing.assert_array_equal(np.concatenate(list(export.iter_npy(shard, 333))), np.load(shard))


def test_vectors_through_the_export_path_round_trip(tiny, tmp_path):
  rng = np.random.default_rng(0)
  v = rng.normal(size=(50, 32)).astype(np.float32)
  ids = [f"v{i}" for i in range(50)]
  meta = lambda r: {"listing_id": [ids[i] for i in r], "title": [f"t\u2028{i}" for i in r],
                    "supplier_id": ["s"] * len(r), "category": ["c"] * len(r), "image": [""] * len(r)}
  config = tiny.config.copy_and_resolve_references()
  config.eval.export.modalities = "m"
  chunks = ((ids[s:s + 16], {"m": v[s:s + 16]}, meta(range(s, min(50, s + 16)))) for s in range(0, 50, 16))
  manifest = export.export_vectors(chunks, tmp_path / "v", config)
  assert manifest["count"] == 50 and manifest["index"]["m"]["kind"] == "exact"
  s = search.Searcher(tmp_path / "v")
  np.testing.assert_array_equal(s.vectors("m"), v)
  assert s.meta["title"][7] == "t\u20287"
  hits = s.by_id("v3", k=49)
  assert [h.listing_id for h in hits] == [ids[i] for i in np.argsort(-(v @ v[3]), kind="stable") if i != 3]


def _hybrid_searcher(exported, tiny, **hybrid):
  config = tiny.config.copy_and_resolve_references()
  config.eval.hybrid.update(**hybrid)
  return search.Searcher(exported[0], model=tiny.model, params=tiny.params, config=config), config


def test_hybrid_search_fuses_title_tfidf_over_the_pool(exported, tiny):
  from esspr_jax.retrieval import tfidf_baseline
  s, _ = _hybrid_searcher(exported, tiny, weight=0.6, candidates=100)
  titles = [str(t) for t in s.meta["title"]]
  r = s.row("item_1")
  hits = s.by_id("item_1", k=6, hybrid=True)
  # The pool is every other listing here (21 < candidates): brute-force min-max fusion.
  others = [i for i in range(len(titles)) if i != r]
  vec = s.vectors("m")
  dense = [float(vec[i] @ vec[r]) for i in others]
  lex = list(tfidf_baseline.tfidf_scores([titles[r]], titles, fit_on=titles)[0][others])
  norm = lambda v: [(x - min(v)) / (max(v) - min(v)) for x in v]  # noqa: E731
  fused = [0.6 * a + 0.4 * b for a, b in zip(norm(dense), norm(lex))]
  order = sorted(range(len(others)), key=lambda i: -fused[i])[:6]
  assert [h.listing_id for h in hits] == [str(s.ids[others[i]]) for i in order]
  assert [h.score for h in hits] == pytest.approx([fused[i] for i in order], abs=1e-5)
  # A text query: the lexical side alone (w=0) puts the exact title first.
  s0, _ = _hybrid_searcher(exported, tiny, weight=0.0)
  text = titles[3]
  top = s0.by_text(text, k=3, gallery="t", hybrid=True)
  assert top[0].title == text
  with pytest.raises(DataError, match="'t' or 'm' gallery"):
    s.by_id("item_1", k=3, gallery="i", hybrid=True)


def test_search_command_honours_eval_search_hybrid(exported, tiny, capsys):
  config = tiny.config.copy_and_resolve_references()
  config.eval.search.hybrid = True
  config.eval.hybrid.update(method="rrf", rrf_k=5)
  hits = search.search_from_config(config, None, exported[0], listing_id="item_1", k=3)
  assert len(hits) == 3 and hits[0].listing_id == "item_1_dup"   # same title, same vector
  assert hits[0].score == pytest.approx(2 / 6)                   # rank 1 on both sides
  assert "item_1_dup" in capsys.readouterr().out


def _small_export(tiny, out, n=20, seed=0):
  """export_vectors of n random vectors (modality m) into `out`."""
  v = np.random.default_rng(seed).normal(size=(n, 32)).astype(np.float32)
  ids = [f"v{i}" for i in range(n)]
  meta = {"listing_id": ids, "title": ids, "supplier_id": ["s"] * n, "category": ["c"] * n,
          "image": [""] * n}
  config = tiny.config.copy_and_resolve_references()
  config.eval.export.modalities = "m"
  return export.export_vectors([(ids, {"m": v}, meta)], out, config)


def _tree(root):
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_export_dir_that_is_not_an_export_is_refused_and_left_alone(tiny, tmp_path):
  """25.7: --export_dir at a directory of other files once deleted its index/, delta/,
  work/ and manifest.json and listed the rest in the manifest."""
  home = tmp_path / "home"
  for name, text in {"index/notes.txt": "mine", "delta/x": "mine", "work/y": "mine",
                     "manifest.json": "{}", "photo.jpg": "mine"}.items():
    (home / name).parent.mkdir(parents=True, exist_ok=True)
    (home / name).write_text(text)
  before = _tree(home)
  with pytest.raises(DataError, match="is not empty and is not an export"):
    _small_export(tiny, home)
  assert _tree(home) == before
  # Our own export with a file dropped into it: refused by name, nothing touched.
  out = tmp_path / "out"
  _small_export(tiny, out)
  assert (out / export.MARKER).is_file()
  (out / "notes.txt").write_text("not the export's")
  before = _tree(out)
  with pytest.raises(DataError, match=r"holds files an export does not write: \['notes.txt'\]"):
    _small_export(tiny, out, seed=1)
  assert _tree(out) == before
  (out / "notes.txt").unlink()
  assert _small_export(tiny, out, seed=1)["count"] == 20        # an export of ours: rewritten
  assert export.MARKER in json.loads((out / "manifest.json").read_text())["assets"]


def test_temporaries_of_a_killed_export_are_removed_not_listed(tiny, tmp_path):
  """25.21: a shard writer killed mid-file leaves `<shard>.<random>.tmp`; the next export
  removes it instead of listing it in the manifest."""
  out = tmp_path / "out"
  _small_export(tiny, out)
  stale = out / (export.shard_name("ids", 0, 1) + ".k1ll3d.tmp")
  stale.write_bytes(b"half a shard")
  manifest = _small_export(tiny, out, seed=3)
  assert not stale.exists() and stale.name not in manifest["assets"]
  assert sorted(search.Searcher(out).ids.tolist()) == sorted(f"v{i}" for i in range(20))


def test_an_export_from_before_the_marker_is_still_rewritten(tiny, tmp_path):
  """25.7: exports made before the marker (a manifest.json of this format) and
  interrupted ones (a progress record of it) are taken as ours; the marker is added."""
  out = tmp_path / "old"
  _small_export(tiny, out)
  (out / export.MARKER).unlink()
  manifest = json.loads((out / "manifest.json").read_text())
  manifest["assets"].pop(export.MARKER)
  (out / "manifest.json").write_text(json.dumps(manifest))
  assert _small_export(tiny, out, seed=2)["count"] == 20
  assert (out / export.MARKER).is_file()
  search.Searcher(out)
  partial = tmp_path / "partial"
  (partial / "work").mkdir(parents=True)
  (partial / "work" / "progress.process-00000.json").write_text(
      json.dumps({"fingerprint": {"format": export.FORMAT}, "chunk_hashes": []}))
  assert _small_export(tiny, partial)["count"] == 20
  other = tmp_path / "other"
  other.mkdir()
  (other / "manifest.json").write_text(json.dumps({"format": "someone-else/1"}))
  with pytest.raises(DataError, match="is not an export"):
    _small_export(tiny, other)
