"""Index updates: after --update the searcher answers exactly like a from-scratch export
of the same listings (exact mode), never returns a deleted or superseded row, and folds
the delta into a new base past eval.export.rebuild_fraction."""
import shutil

import numpy as np
import pytest

from esspr_jax.errors import DataError
from esspr_jax.ingest.catalog import Listing
from esspr_jax.retrieval import export, index, search, update

INFO = {"checkpoint": None, "step": 5}


def base_catalog(tiny):
  items, listings = [], {}
  for n, pair in enumerate(tiny.source):
    for side in ("trigger", "recall"):
      s = dict(pair[side])
      items.append(s)
      listings[s["id"]] = Listing(s["id"], f"sup{n % 3}", "lv1", f"cat{n % 2}", s["title"],
                                  f"{s['id']}.jpg")
  return items, listings


def changed_catalog(items, listings, round_):
  """Round 1: 3 deleted, 2 retitled, 1 moved supplier, 2 new. Round 2: more of the same."""
  items, listings = [dict(it) for it in items], dict(listings)
  drop = {1: (2, 7, 11), 2: (0, 1)}[round_]
  for d in sorted(drop, reverse=True):
    listings.pop(items[d]["id"])
    del items[d]
  for d in {1: (3, 5), 2: (4,)}[round_]:
    items[d]["title"] = f"retitled {round_} {items[d]['title']}"
    old = listings[items[d]["id"]]
    listings[old.listing_id] = Listing(old.listing_id, old.supplier_id, "lv1", old.cate_name,
                                       items[d]["title"], old.image)
  old = listings[items[8]["id"]]
  listings[old.listing_id] = Listing(old.listing_id, f"moved{round_}", "lv1", old.cate_name,
                                     old.title, old.image)
  for n in range({1: 2, 2: 6}[round_]):
    src = items[n]
    new = dict(src, id=f"new{round_}_{n}", title=f"new listing {n} {src['title']}")
    items.append(new)
    listings[new["id"]] = Listing(new["id"], "supN", "lv1", "cat0", new["title"], "x.jpg")
  return items, listings


def run_export(tiny, items, listings, out, config=None, *, upd=False):
  fn = update.update_export if upd else export.export_embeddings
  return fn(tiny.model, tiny.params, items, out, config or tiny.config, tokenizer=tiny.tokenizer,
            listings=listings, checkpoint_info=INFO)


def assert_same_answers(a: search.Searcher, b: search.Searcher, live_ids, dead_ids):
  """Every live listing's neighbours (all of them, and a top 5) agree in ids and scores."""
  assert set(a.row_of) == set(b.row_of) == set(live_ids)
  n = len(live_ids)
  for listing in live_ids:
    for gallery in ("m", "i"):
      ha, hb = a.by_id(listing, k=n, gallery=gallery), b.by_id(listing, k=n, gallery=gallery)
      assert len(ha) == len(hb) == n - 1
      assert not {h.listing_id for h in ha} & set(dead_ids)
      np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-5)
      score_b = {h.listing_id: h.score for h in hb}
      for h in ha:
        assert h.score == pytest.approx(score_b[h.listing_id], abs=1e-5)
        assert (h.title, h.supplier_id, h.category) == (b.meta["title"][b.row(h.listing_id)],
                                                        b.meta["supplier_id"][b.row(h.listing_id)],
                                                        b.meta["category"][b.row(h.listing_id)])
      top_a = [h.listing_id for h in a.by_id(listing, k=5, gallery=gallery)]
      top_b = [h.listing_id for h in b.by_id(listing, k=5, gallery=gallery)]
      scores = sorted(score_b.values(), reverse=True)
      if len(scores) <= 5 or scores[4] - scores[5] > 1e-4:   # no tie at the cut
        assert set(top_a) == set(top_b)


def test_updates_answer_like_a_fresh_export_and_fold_past_the_fraction(tiny, tmp_path, monkeypatch):
  items, listings = base_catalog(tiny)
  out = tmp_path / "live"
  run_export(tiny, items, listings, out)
  embedded = []
  real = export.embed_items
  monkeypatch.setattr(export, "embed_items",
                      lambda m, p, its, *a, **k: embedded.extend(its) or real(m, p, its, *a, **k))

  config = tiny.config.copy_and_resolve_references()
  config.eval.export.rebuild_fraction = 0.6
  items1, listings1 = changed_catalog(items, listings, 1)
  manifest = run_export(tiny, items1, listings1, out, config, upd=True)
  # Only new or changed listings were embedded: 2 retitled, 1 moved supplier, 2 new.
  assert sorted(e["id"] for e in embedded) == sorted(
      [items1[3]["id"], items1[5]["id"], items1[8]["id"], "new1_0", "new1_1"])
  assert manifest["delta"]["count"] == 5 and manifest["delta"]["dead"] == 3 + 3
  assert manifest["update"] == {"embedded": 5, "removed": 3}
  dead = {items[d]["id"] for d in (2, 7, 11)}
  fresh1 = tmp_path / "fresh1"
  run_export(tiny, items1, listings1, fresh1)
  live = search.Searcher(out)
  assert isinstance(live.index("m"), index.LiveIndex)
  assert_same_answers(live, search.Searcher(fresh1), [it["id"] for it in items1], dead)
  with pytest.raises(DataError, match="unknown listing id"):
    live.by_id(sorted(dead)[0])

  # Round 2 pushes delta + retired rows past 0.6 of the live rows: a fold.
  embedded.clear()
  items2, listings2 = changed_catalog(items1, listings1, 2)
  manifest = run_export(tiny, items2, listings2, out, config, upd=True)
  assert manifest["delta"] is None and manifest["update"]["folded"] is True
  assert len(embedded) == 1 + 1 + 6        # retitled, moved, new: retired rows not redone
  dead |= {items1[0]["id"], items1[1]["id"]}
  fresh2 = tmp_path / "fresh2"
  run_export(tiny, items2, listings2, fresh2)
  folded = search.Searcher(out)
  assert not isinstance(folded.index("m"), index.LiveIndex)
  assert sorted(folded.ids.tolist()) == sorted(it["id"] for it in items2)
  assert_same_answers(folded, search.Searcher(fresh2), [it["id"] for it in items2], dead)
  # A later update with nothing changed embeds nothing and changes no answer.
  embedded.clear()
  manifest = run_export(tiny, items2, listings2, out, config, upd=True)
  assert embedded == [] and manifest["delta"]["count"] == 0 and manifest["delta"]["dead"] == 0


def test_scann_base_never_returns_a_retired_row(tiny, tmp_path):
  items, listings = base_catalog(tiny)
  config = tiny.config.copy_and_resolve_references()
  config.eval.index.exact_max_gallery = 0        # a ScaNN base
  config.eval.export.rebuild_fraction = 1.0
  out = tmp_path / "scann"
  run_export(tiny, items, listings, out, config)
  drop = {it["id"] for it in items[::3]}
  kept = [it for it in items if it["id"] not in drop]
  run_export(tiny, kept, {i: listings[i] for i in (it["id"] for it in kept)}, out, config, upd=True)
  s = search.Searcher(out)
  assert s.index("m").base.kind == "scann"
  vectors = np.asarray(s.vectors("m"), np.float32)
  ids, _ = s.index("m").search(vectors, s.index("m").size)
  returned = {s.ids[r] for r in ids.ravel() if r >= 0}
  assert returned and not returned & drop
  for it in kept:
    assert not {h.listing_id for h in s.by_id(it["id"], k=len(kept))} & drop


def test_update_refuses_another_model_and_cleans_an_interrupted_one(tiny, tmp_path):
  items, listings = base_catalog(tiny)
  out = tmp_path / "e"
  run_export(tiny, items, listings, out)
  with pytest.raises(DataError, match="same model"):
    update.update_export(tiny.model, tiny.params, items, out, tiny.config,
                         tokenizer=tiny.tokenizer, listings=listings,
                         checkpoint_info={"checkpoint": None, "step": 6})
  stray = out / "delta" / "gen-000009"
  stray.mkdir(parents=True)
  (stray / "ids.npy").write_bytes(b"half written")
  with pytest.raises(DataError, match="not in its manifest"):
    search.Searcher(out)
  manifest = run_export(tiny, items, listings, out, upd=True)
  assert not stray.exists() and manifest["delta"]["count"] == 0
  assert search.Searcher(out).by_id(items[0]["id"], k=3)


def test_plan_is_pure_row_arithmetic():
  base_ids = np.array(["a", "b", "c"])
  h = lambda x: np.frombuffer(x.ljust(16, b"-"), np.uint8)
  base_hash = np.stack([h(b"a"), h(b"b"), h(b"c")])
  delta = {"ids": np.array(["d"]), "hash": np.stack([h(b"d")])}
  embed, keep, retired, removed = update.plan(
      base_ids, base_hash, np.array([False, False, True]), delta,
      ["a", "b2", "d", "c"], [h(b"a").tobytes(), h(b"x").tobytes(), h(b"d").tobytes(),
                              h(b"c").tobytes()])
  # a kept; b gone (retired); b2 new; d kept in the delta; c was retired: re-embedded.
  assert embed == [1, 3] and keep == [0] and removed == 1
  assert retired.tolist() == [False, True, True]


class _Killed(BaseException):
  """Stands for a SIGKILL at one step of a fold (not an Exception: nothing may catch it)."""


def _kill_at(monkeypatch, n):
  """Makes the n-th directory rename or tree removal of this process raise _Killed
  (before it happens); returns the count of such steps seen."""
  import os
  import shutil
  seen = [0]

  def step(real, dirs_only):
    def wrapped(src, *a, **k):
      if not dirs_only or os.path.isdir(src):
        seen[0] += 1
        if seen[0] == n:
          raise _Killed(f"step {n}: {real.__name__}({src})")
      return real(src, *a, **k)
    return wrapped
  monkeypatch.setattr(os, "rename", step(os.rename, True))
  monkeypatch.setattr(os, "replace", step(os.replace, True))
  monkeypatch.setattr(shutil, "rmtree", step(shutil.rmtree, False))
  return seen


def test_a_fold_killed_at_any_step_leaves_a_whole_export_and_the_next_update_cleans(
    tiny, tmp_path, monkeypatch):
  """25.21: a fold once renamed the export aside and then the new one in: killed between,
  no export existed. Killed before each directory step of a fold now, out_dir is the old
  or the new export, whole; the next update removes `.fold-tmp` and finishes."""
  items, listings = base_catalog(tiny)
  template = tmp_path / "template" / "e"
  run_export(tiny, items, listings, template)
  config = tiny.config.copy_and_resolve_references()
  config.eval.export.rebuild_fraction = 0.0   # every update folds
  items1, listings1 = changed_catalog(items, listings, 1)
  old_ids, new_ids = sorted(it["id"] for it in items), sorted(it["id"] for it in items1)
  n = 0
  while True:
    n += 1
    out = tmp_path / f"kill{n}" / "e"
    shutil.copytree(template, out)
    with monkeypatch.context() as patch:
      seen = _kill_at(patch, n)
      try:
        run_export(tiny, items1, listings1, out, config, upd=True)
        finished = True
      except _Killed:
        finished = False
    assert sorted(search.Searcher(out).ids.tolist()) in (old_ids, new_ids), f"killed at {n}"
    manifest = run_export(tiny, items1, listings1, out, config, upd=True)
    assert manifest["count"] == len(new_ids)
    assert sorted(search.Searcher(out).ids.tolist()) == new_ids
    assert [p.name for p in out.parent.iterdir()] == ["e"], f"killed at {n}"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], f"killed at {n}"
    if finished:
      break
  assert n > 3 and seen[0] == n - 1
