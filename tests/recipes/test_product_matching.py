"""Loaders of the public product-matching sets: real files, splits without leakage, bad input."""
import gzip
import json
import pathlib

import numpy as np
import pytest

from esspr_jax.recipes import product_matching as pm
from esspr_jax.ingest.release_format import PairRow
from esspr_jax.errors import DataError


@pytest.fixture(scope="module")
def amazon_google(shared_data):
  return pm.load_amazon_google(shared_data, holdout_fraction=0.3, seed=0)


def _products(pairs):
  return {p.trigger_id for p in pairs} | {p.recall_id for p in pairs}


@pytest.mark.parametrize("broken, fixed", [
    ("ZiplocÃ‚Â® Brand Storage Bags", "Ziploc® Brand Storage Bags"),
    ("Kalamera 15Ã¢â‚¬Â\x9d Beverage Cooler", "Kalamera 15\u201d Beverage Cooler"),
    ("KidsÃƒÂ¢Ã‚â‚¬Ã‚â€œ Fun", "Kids\u2013 Fun"),  # encoded wrongly twice
])
def test_repair_mojibake_undoes_cp1252_misdecoding(broken, fixed):
  assert pm.repair_mojibake(broken) == fixed
  # And the repair is a fixed point: clean text is never touched.
  assert pm.repair_mojibake(fixed) == fixed


@pytest.mark.parametrize("clean", ["6dílná zahradní sedací souprava černý", "Tefal Dóza 0,8 l",
                                   "logic Êexpress 6", "Ångström 2 × 3"])
def test_repair_mojibake_leaves_real_accents_alone(clean):
  assert pm.repair_mojibake(clean) == clean


def test_amazon_google_counts_match_source_md(amazon_google):
  # SOURCE.md: 1,300 gold rows, 3,226 Google products (the gallery).
  assert len(amazon_google.train) + len(amazon_google.heldout.pairs) == 1300
  assert len(amazon_google.heldout.gallery) == 3226
  assert 0.29 <= len(amazon_google.heldout.pairs) / 1300 <= 0.35
  assert amazon_google.skips["skipped"] == 0
  # latin-1 text decoded (not replaced) and CR line endings split into rows.
  titles = list(amazon_google.heldout.gallery.values())
  assert not any("\ufffd" in t or "\r" in t for t in titles)
  assert amazon_google.heldout.gallery["amazon_google/B0"] == "learning quickbooks 2007"


def test_amazon_google_heldout_shares_no_product_with_training(amazon_google):
  assert not _products(amazon_google.train) & _products(amazon_google.heldout.pairs)


def test_amazon_google_split_is_seeded(shared_data, amazon_google):
  again = pm.load_amazon_google(shared_data, holdout_fraction=0.3, seed=0)
  other = pm.load_amazon_google(shared_data, holdout_fraction=0.3, seed=1)
  assert again.heldout.pairs == amazon_google.heldout.pairs
  assert other.heldout.pairs != amazon_google.heldout.pairs


def test_targets_and_ignore_mark_other_positives(amazon_google):
  rs = amazon_google.heldout
  target, ignore = rs.targets_and_ignore()
  ids = rs.gallery_ids()
  for k, pair in enumerate(rs.pairs):
    assert ids[target[k]] == pair.recall_id
    others = {p.recall_id for p in rs.pairs if p.trigger_id == pair.trigger_id} - {pair.recall_id}
    assert {ids[g] for g in ignore[k] if g >= 0} == others
  assert (ignore >= 0).any(), "amazon_google has products with several gold matches"


def test_walmart_amazon_test_split_held_out_without_leakage(shared_data):
  data = pm.load_walmart_amazon(shared_data)
  # SOURCE.md: 193 test positives, 769 train positives.
  assert len(data.heldout.pairs) == 193
  assert len(data.train) + data.dropped_overlapping_heldout == 769
  assert data.dropped_overlapping_heldout > 0
  assert not _products(data.train) & _products(data.heldout.pairs)
  assert all(p.recall_id in data.heldout.gallery for p in data.heldout.pairs)
  assert all(g.startswith("walmart_amazon/amazon_") for g in data.heldout.gallery)


def test_promap_en_cz_positive_pairs_with_repaired_titles(shared_data):
  data = pm.load_promap_en_cz(shared_data)
  assert len(data.train) == 101 + 98 and data.heldout is None
  titles = [t for p in data.train for t in (p.trigger_title, p.recall_title)]
  assert not any("Ã" in t or "â€" in t for t in titles)
  assert any("®" in t for t in titles)  # repaired, not deleted
  assert any("č" in t or "ř" in t for t in titles)  # Czech kept


def test_promap_laptops_pairs_listing_a_with_b(shared_data):
  pairs = pm.load_promap_laptops(shared_data)
  assert len(pairs) == 10
  for k, p in enumerate(pairs, start=1):
    assert (p.trigger_id, p.recall_id) == (f"{k:02d}a", f"{k:02d}b")
    folder = shared_data / "promap_laptops_10pairs"
    assert (folder / p.trigger_img).is_file() and (folder / p.recall_img).is_file()
    assert p.trigger_img.startswith(f"images/{k:02d}a_")


def test_prepare_writes_files_that_read_back(shared_data, tmp_path):
  prepared = pm.prepare(shared_data, tmp_path, validation_fraction=0.15)
  from esspr_jax.ingest import release_format
  train = list(release_format.read_pairs(prepared.train_pairs))
  assert len(train) == sum(c["train_pairs"] for c in prepared.counts.values())
  for name, rs in prepared.heldout.items():
    back = pm.read_retrieval_set(tmp_path / "heldout", name)
    assert back == rs
    assert pm.read_retrieval_set(tmp_path / "validation", name) == prepared.validation[name]
    assert prepared.counts[name]["validation_queries"] == len(prepared.validation[name].pairs)
  assert set(prepared.heldout) == set(prepared.validation) == {"amazon_google", "walmart_amazon"}
  val_offers = {i for rs in prepared.validation.values() for p in rs.pairs
                for i in (p.trigger_id, p.recall_id)}
  assert not val_offers & {i for p in train for i in (p.trigger_id, p.recall_id)}


def _fake_amazon_google(root: pathlib.Path, gold: str) -> None:
  folder = root / "amazon_google"
  folder.mkdir(parents=True)
  header = b"id,title,description,manufacturer,price\r"
  (folder / "tableA.csv").write_bytes(header + "0,caf\xe9 maker,,acme,\r1,toaster,,,\r".encode("latin-1"))
  (folder / "tableB.csv").write_bytes(header + b"0,cafe maker 2000,,,\r1,,,,\r2,a toaster,,,\r")
  (folder / "gold.csv").write_text(gold)


def test_bad_gold_rows_are_counted_or_raise_in_strict_mode(tmp_path):
  _fake_amazon_google(tmp_path, "tableA_id,tableB_id\n0,0\n1,2\n1,7\n")
  data = pm.load_amazon_google(tmp_path, holdout_fraction=0.0)
  assert [(p.trigger_title, p.recall_title) for p in data.train] == [
      ("café maker", "cafe maker 2000"), ("toaster", "a toaster")]
  assert data.skips["by_reason"] == {"empty_title": 1, "unknown_id": 1}
  with pytest.raises(DataError, match=r"tableB.csv:3: empty_title"):
    pm.load_amazon_google(tmp_path, holdout_fraction=0.0, strict=True)


def test_walmart_bad_json_line_is_counted(tmp_path):
  folder = tmp_path / "walmart_amazon"
  folder.mkdir()
  good = {"id_left": "walmart_1", "title_left": "a b", "id_right": "amazon_1",
          "title_right": "a b c", "label": 1}
  for name in ("walmart-amazon-train.json.gz", "walmart-amazon-gs.json.gz"):
    with gzip.open(folder / name, "wt") as f:
      f.write(json.dumps(dict(good, id_left=f"walmart_{name[15:17]}")) + "\n{not json\n")
  data = pm.load_walmart_amazon(tmp_path)
  assert data.skips["by_reason"] == {"bad_json_row": 2}
  assert len(data.heldout.pairs) == 1


def test_missing_and_reserved_data_are_refused(tmp_path, shared_data):
  with pytest.raises(DataError, match="missing data file .*gold.csv"):
    (tmp_path / "amazon_google").mkdir()
    (tmp_path / "amazon_google" / "tableA.csv").write_text("id,title\n")
    (tmp_path / "amazon_google" / "tableB.csv").write_text("id,title\n")
    pm.load_amazon_google(tmp_path)
  with pytest.raises(DataError, match="reserved"):
    pm._require(shared_data / "abt_buy" / "anything.csv")


def test_read_retrieval_set_rejects_positive_outside_gallery(tmp_path):
  pair = PairRow("x", "", "q1", "query", "g9", "gone", "", "", 1)
  pm.write_retrieval_set(tmp_path, pm.RetrievalSet("toy", (pair,), {"g1": "other"}))
  with pytest.raises(DataError, match="not in the gallery"):
    pm.read_retrieval_set(tmp_path, "toy")


def test_targets_and_ignore_small_example():
  rows = [PairRow("x", "", q, q, g, g, "", "", 1) for q, g in
          [("q1", "g2"), ("q1", "g0"), ("q2", "g1")]]
  rs = pm.RetrievalSet("toy", tuple(rows), {"g0": "", "g1": "", "g2": ""})
  target, ignore = rs.targets_and_ignore()
  np.testing.assert_array_equal(target, [2, 0, 1])
  np.testing.assert_array_equal(ignore, [[0], [2], [-1]])


@pytest.mark.parametrize("name", ["amazon_google", "walmart_amazon"])
def test_validation_is_carved_from_training_and_never_touches_heldout(shared_data, name):
  load = {"amazon_google": lambda f, s: pm.load_amazon_google(shared_data, 0.3, s,
                                                              validation_fraction=f),
          "walmart_amazon": lambda f, s: pm.load_walmart_amazon(shared_data, False, f, s)}[name]
  plain, data = load(0.0, 0), load(0.15, 0)
  assert plain.validation is None
  val = data.validation
  # The carve-out comes out of the training pairs only; held-out task unchanged.
  assert data.heldout == plain.heldout
  assert len(data.train) + len(val.pairs) == len(plain.train)
  assert set(data.train) | set(val.pairs) == set(plain.train)
  assert 0.13 <= len(val.pairs) / len(plain.train) <= 0.25
  # No shared offer ids with the held-out task or with the remaining training pairs.
  val_offers = _products(val.pairs)
  assert not val_offers & _products(data.heldout.pairs)
  assert not val_offers & _products(data.train)
  held_offers = _products(data.heldout.pairs)
  assert not set(val.gallery) & held_offers
  assert all(p.recall_id in val.gallery for p in val.pairs)
  assert len(val.gallery) > len(set(p.recall_id for p in val.pairs))   # has distractors
  # Seeded: the same seed gives the same task, another seed another one.
  assert load(0.15, 0).validation == val and load(0.15, 1).validation != val
  with pytest.raises(ValueError, match="validation_fraction"):
    load(1.0, 0)


def test_carve_validation_small_example():
  rows = [PairRow("x", "", f"a{a}", f"ta{a}", f"b{b}", f"tb{b}", "", "", 1)
          for a, b in [(1, 1), (1, 2), (2, 2), (3, 3), (4, 4), (5, 5)]]
  gallery = {"b9": "held", "b8": "other"}
  train, val = pm.carve_validation("toy", rows, 0.4, 0, gallery, exclude={"b9"})
  # Components: {0,1,2} (a1-b1, a1-b2, a2-b2), {3}, {4}, {5}: whole components move.
  comps = [{0, 1, 2}, {3}, {4}, {5}]
  moved = {rows.index(p) for p in val.pairs}
  assert len(moved) >= 0.4 * 6
  assert all(c <= moved or not c & moved for c in comps)
  assert set(train) == set(rows) - set(val.pairs)
  assert "b9" not in val.gallery and val.gallery["b8"] == "other"
  assert pm.carve_validation("toy", rows, 0.0, 0, gallery) == (tuple(rows), None)
