"""One way to read a CSV record (ingest/csv_records.py) in every reader: the catalog
(mining, export metadata, export items), pair files (the builder) and click logs.
Unicode line separators stay inside a title, a multi-line record with a bad line is
skipped once, long fields are read (titles over the maximum counted), and a header-only
click log is an error at mining."""
import csv
import io
import pathlib

import pytest
from PIL import Image

from esspr_jax.errors import DataError
from esspr_jax.ingest import catalog, clicklog, release_format
from esspr_jax.ingest.csv_records import MAX_TITLE_CHARS
from esspr_jax.ingest.skips import SkipCounter

CATALOG_HEADER = ["listing_id", "style_id", "supplier_id", "cate_lv1_name", "cate_name",
                  "title", "image"]
PAIR_HEADER = list(release_format.FIELDS)
# Every character str.splitlines splits at that a CSV record may hold unquoted.
SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"


def _write(path, header, rows) -> pathlib.Path:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def _jpeg(path):
  buf = io.BytesIO()
  Image.new("RGB", (16, 16), (90, 10, 10)).save(buf, format="JPEG")
  path.write_bytes(buf.getvalue())


def test_line_separators_stay_inside_a_title_in_mining_and_export_alike(tmp_path):
  from esspr_jax.input import pipeline
  for name in ("a.jpg", "b.jpg"):
    _jpeg(tmp_path / name)
  title = f"red{SEPARATORS}mug"
  path = _write(tmp_path / "catalog.csv", CATALOG_HEADER, [
      ["a", "s1", "S", "Home", "Mugs", title, "a.jpg"],
      ["b", "s1", "S", "Home", "Mugs", "blue mug", "b.jpg"]])
  skips = SkipCounter("catalog")
  listings = catalog.read_catalog(str(path), skips)
  assert skips.skipped == 0 and listings["a"].title == title and listings["a"].image == "a.jpg"
  items = pipeline.CatalogItems(path, tmp_path)  # what export embeds
  assert [(items[i]["id"], items[i]["title"]) for i in range(len(items))] == [
      ("a", title), ("b", "blue mug")]


def _bytes_with_bad_line_in_a_title(header: list[str], before: list[str], after: list[str]):
  """A file whose second record's quoted title spans three lines, the middle one not
  UTF-8; a good record follows."""
  good = ",".join(header).encode() + b"\n"
  return (good + ",".join(before).encode() + b',"first line\n\xff\xfe bad line\nlast line",'
          + ",".join(after).encode() + b"\n")


def test_a_multi_line_record_with_a_bad_line_is_skipped_once_not_kept(tmp_path):
  # Catalog: listing x's title is the broken one; listing y follows.
  path = tmp_path / "catalog.csv"
  path.write_bytes(_bytes_with_bad_line_in_a_title(CATALOG_HEADER, ["x", "s", "S", "H", "M"],
                                                   ["x.jpg"])
                   + b"y,s,S,H,M,good title,y.jpg\n")
  skips = SkipCounter("catalog")
  assert list(catalog.read_catalog(str(path), skips)) == ["y"]
  assert skips.summary()["by_reason"] == {"bad_encoding": 1}
  # Pair file: the broken trigger title's row is skipped, the next row kept intact.
  pairs = tmp_path / "pairs.csv"
  pairs.write_bytes(_bytes_with_bad_line_in_a_title(PAIR_HEADER, ["H", "M", "a"],
                                                    ["b", "t b", "a.jpg", "b.jpg", "1"])
                    + b"H,M,c,t c,d,t d,c.jpg,d.jpg,1\n")
  skips = SkipCounter("pairs")
  rows = list(release_format.read_pairs(pairs, skips))
  assert [(r.trigger_id, r.source_row) for r in rows] == [("c", 5)]
  assert skips.summary()["by_reason"] == {"bad_encoding": 1}
  # Click log: the same for a multi-line query.
  log = tmp_path / "log.csv"
  log.write_bytes(_bytes_with_bad_line_in_a_title(
      list(clicklog.COLUMNS[:2]) + ["query"] + list(clicklog.COLUMNS[3:]), ["s1", "1"],
      ["1", "a", "S", "H", "M", "0.9", "1"]) + b"s2,1,mug,1,b,S,H,M,0.9,1\n")
  skips = SkipCounter("log")
  assert [c.session_id for c in clicklog.read_clicklog(str(log), skips=skips)] == ["s2"]
  assert skips.summary()["by_reason"] == {"bad_encoding": 1}


def test_fields_over_the_csv_default_limit_are_read_and_long_titles_counted(tmp_path):
  huge = "x" * (MAX_TITLE_CHARS + 200_000)  # over both our maximum and csv's 131,072
  long_ok = "y" * MAX_TITLE_CHARS
  path = _write(tmp_path / "catalog.csv", CATALOG_HEADER, [
      ["a", "s", "S", "H", "M", huge, "a.jpg"], ["b", "s", "S", "H", "M", long_ok, "b.jpg"]])
  skips = SkipCounter("catalog")
  assert list(catalog.read_catalog(str(path), skips)) == ["b"]
  assert skips.summary()["by_reason"] == {"title_too_long": 1}
  pairs = _write(tmp_path / "pairs.csv", PAIR_HEADER, [
      ["H", "M", "a", huge, "b", "t", "a.jpg", "b.jpg", "1"],
      ["H", "M", "c", long_ok, "d", "t", "c.jpg", "d.jpg", "1"]])
  skips = SkipCounter("pairs")
  assert [r.trigger_id for r in release_format.read_pairs(pairs, skips)] == ["c"]
  assert skips.summary()["by_reason"] == {"title_too_long": 1}
  log = _write(tmp_path / "log.csv", clicklog.COLUMNS,
               [["s1", "1", huge, "1", "a", "S", "H", "M", "0.9", "1"]])
  assert len(list(clicklog.read_clicklog(str(log)))) == 1  # read, not a _csv.Error


def test_a_header_only_click_log_is_an_error_at_mining(tmp_path):
  from esspr_jax.config.data import mining_config
  from esspr_jax.ingest import mining
  log = _write(tmp_path / "log.csv", clicklog.COLUMNS, [])
  cat = _write(tmp_path / "catalog.csv", CATALOG_HEADER, [["a", "s", "S", "H", "M", "t", "a.jpg"]])
  with pytest.raises(DataError) as info:
    mining.mine_pairs(str(log), str(cat), str(tmp_path / "pairs.csv"), mining_config("tiny"),
                      verbose=False)
  assert str(info.value) == f"{log}: click log has a header but no rows; nothing to mine"
  assert not (tmp_path / "pairs.csv").exists()
