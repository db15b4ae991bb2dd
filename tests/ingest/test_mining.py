"""Click-log mining: each constraint on a hand-made log, every bad-row kind, precision.

Beam runs cost about a second each, so each run below checks several things at once.
"""
import csv
import json
import math
import re
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esspr_jax import cli
from esspr_jax.config.data import mining_config, world_config
from esspr_jax.demo_world import synthetic
from esspr_jax.ingest import clicklog, mining
from esspr_jax.ingest.catalog import COLUMNS as CATALOG_COLUMNS
from esspr_jax.demo_world.pair_precision import pair_precision, precision_of
from esspr_jax.ingest.release_format import read_pairs
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.errors import ConfigError, DataError

REPO = pathlib.Path(__file__).resolve().parents[2]
HEADER = list(clicklog.COLUMNS)
MUG = ("Home & Kitchen", "Mugs")
SCREW = ("Hardware", "Screws & Bolts")
LISTINGS = {  # listing -> (style, category)
    "a1": ("A", MUG), "a2": ("A", MUG), "a3": ("B", MUG), "a4": ("C", MUG),
    "a5": ("D", MUG), "a6": ("D", MUG), "a7": ("E", MUG), "b1": ("A", SCREW),
    "c1": ("F", MUG), "c2": ("F", MUG), "c3": ("G", MUG), "c4": ("G", MUG),
    "h": ("H", MUG), "x1": ("H", MUG), "x2": ("J", MUG), "x3": ("K", MUG),
}


def _row(session, pos, listing, rel, clicked, cat=None, query="red mug"):
  lv1, leaf = cat or LISTINGS[listing][1]
  return [session, 1000 + pos, query, pos, listing, "SUP1", lv1, leaf, rel, clicked]


# Good rows. Expected with both constraints: (a1,a2) [twice: s1, s4] and (a5,a6).
GOOD = [
    _row("s1", 1, "a1", "0.95", 1), _row("s1", 2, "a2", "0.90", 1), _row("s1", 3, "a7", "0.9", 0),
    _row("s2", 1, "a1", "0.90", 1), _row("s2", 2, "b1", "0.90", 1),      # category differs
    _row("s3", 1, "a3", "0.95", 1), _row("s3", 2, "a4", "0.50", 1),      # a4 not relevant
    _row("s4", 1, "a2", "0.90", 1), _row("s4", 2, "a1", "0.85", 1),      # (a1,a2) again
    _row("s5", 1, "a5", "0.90", 1), _row("s5", 3, "a5", "0.90", 1),      # a5 twice: self pair
    _row("s5", 2, "a6", "0.90", 1),
]
BAD = {  # reason -> raw CSV line
    "wrong_column_count": "s9,1,red mug,1,a1",
    "empty_id": "s9,1,red mug,2,,SUP1,Home & Kitchen,Mugs,0.9,1",
    "empty_query": "s9,1,,3,a1,SUP1,Home & Kitchen,Mugs,0.9,1",
    "bad_number": "s9,1,red mug,fourth,a1,SUP1,Home & Kitchen,Mugs,0.9,1",
    "bad_relevance": "s9,1,red mug,5,a1,SUP1,Home & Kitchen,Mugs,nan,1",
    "bad_clicked": "s9,1,red mug,7,a1,SUP1,Home & Kitchen,Mugs,0.9,maybe",
    "unknown_category": "s9,1,red mug,8,a1,SUP1,Home & Kitchen,Teapots,0.9,1",
    "duplicate_row": "s1,1001,red mug,1,a1,SUP1,Home & Kitchen,Mugs,0.95,1",
    "unknown_listing": "s9,1,red mug,9,zz,SUP1,Home & Kitchen,Mugs,0.9,1",
    "category_mismatch": "s9,1,red mug,10,a3,SUP1,Hardware,Screws & Bolts,0.9,1",
}
OUT_OF_RANGE = "s9,1,red mug,6,a1,SUP1,Home & Kitchen,Mugs,1.5,1"   # second bad_relevance
NOT_UTF8 = b"s9,1,r\xe9d mug,11,a1,SUP1,Home & Kitchen,Mugs,0.9,1"


def _write_catalog(path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(CATALOG_COLUMNS)
    for lid, (style, (lv1, leaf)) in LISTINGS.items():
      w.writerow([lid, style, "SUP1", lv1, leaf, f"title, of {lid}", f"images/{lid}.jpg"])


def _write_log(path: pathlib.Path, rows, bad_lines=()) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [",".join(HEADER).encode()] + [",".join(map(str, r)).encode() for r in rows]
  lines += [line if isinstance(line, bytes) else line.encode() for line in bad_lines]
  path.write_bytes(b"\n".join(lines) + b"\n")
  return path


def _byte_where(path: pathlib.Path, line: int) -> str:
  """The split reader's name for 1-based `line` of a CSV file: 'file:byte OFFSET'."""
  lines = path.read_bytes().split(b"\n")
  return f"{path}:byte {sum(len(x) + 1 for x in lines[:line - 1])}"


def _cfg(**overrides):
  cfg = mining_config("tiny")
  cfg.max_pairs_per_query = 0
  cfg.max_pairs_per_listing = 0
  cfg.max_bad_fraction = 1.0
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _pairs(path) -> set:
  return {tuple(sorted((r.trigger_id, r.recall_id))) for r in read_pairs(path)}


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
  root = tmp_path_factory.mktemp("hand_made")
  _write_catalog(root / "cat" / "catalog.csv")
  bad = list(BAD.values()) + [OUT_OF_RANGE, NOT_UTF8]
  _write_log(root / "log.csv", GOOD, bad)
  return root


@pytest.fixture(scope="module")
def constrained(hand_made):
  out = hand_made / "out" / "pairs.csv"
  report = mining.mine_pairs(hand_made / "log.csv", hand_made / "cat" / "catalog.csv", out,
                             _cfg(), verbose=False)
  return report, out


def test_constraints_self_pairs_and_dedupe_on_a_hand_made_log(constrained):
  report, out = constrained
  assert _pairs(out) == {("a1", "a2"), ("a5", "a6")}
  s = report.stages
  assert s["candidates"] == 6              # 5 listing pairs + 1 self pair
  assert s["dropped_self_pair"] == 1 and s["dropped_category"] == 1
  assert s["dropped_relevance"] == 1
  assert s["merged_duplicates"] == 1 and s["unique_pairs"] == 2 and s["pairs_written"] == 2
  # 11 good clicks + 3 bad rows caught after parsing (duplicate, unknown listing, mismatch).
  assert report.clicks == 11 + 3 and report.impressions == 1
  assert report.rows_read == len(GOOD) + len(BAD) + 2


def test_every_bad_row_kind_is_counted_and_rejected_with_its_row(constrained, hand_made):
  report, out = constrained
  expected = {reason: 1 for reason in BAD}
  expected["bad_relevance"] = 2
  expected["bad_encoding"] = 1
  assert report.skipped == expected
  with open(report.rejects, newline="", encoding="utf-8") as f:
    rejects = {(r["reason"], r["where"]) for r in csv.DictReader(f)}
  log = hand_made / "log.csv"
  first_bad_line = len(GOOD) + 2
  # Rows are named by byte offset (the reader splits files by byte range); each names
  # exactly its own line.
  for line_offset, reason in enumerate(BAD):
    assert (reason, _byte_where(log, first_bad_line + line_offset)) in rejects, reason
  assert ("duplicate_row", _byte_where(log, 2)) not in rejects  # the first copy is kept
  assert ("bad_encoding", _byte_where(log, first_bad_line + len(BAD) + 1)) in rejects


def test_output_rows_are_release_format_with_catalog_fields(constrained):
  _, out = constrained
  with open(out, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["cate_lv1_name", "cate_name", "trigger_id", "trigger_title",
                           "recall_id", "recall_title", "trigger_img", "recall_img", "label"]
  for r in rows:
    assert (r["cate_lv1_name"], r["cate_name"]) == MUG and r["label"] == "1"
    assert r["trigger_title"] == f"title, of {r['trigger_id']}"     # quoted comma survives
    # catalog at cat/, output at out/: image paths are rewritten to resolve from out/.
    assert r["recall_img"] == f"../cat/images/{r['recall_id']}.jpg"
  assert not list(out.parent.glob("*.tmp-*"))


def test_no_constraints_keeps_noise_and_reads_parquet(hand_made, tmp_path):
  table = pa.table({name: [r[i] for r in GOOD] for i, name in enumerate(HEADER)})
  table = table.set_column(HEADER.index("relevance"), "relevance",
                           pa.array([float(r[8]) for r in GOOD]))
  pq.write_table(table, tmp_path / "log.parquet")
  out = tmp_path / "pairs.csv"
  report = mining.mine_pairs(tmp_path / "log.parquet", hand_made / "cat" / "catalog.csv", out,
                             _cfg(category_constraint=False, relevance_constraint=False),
                             verbose=False)
  assert _pairs(out) == {("a1", "a2"), ("a1", "b1"), ("a3", "a4"), ("a5", "a6")}
  assert report.skipped == {} and report.rows_read == len(GOOD)
  precision = pair_precision(out, hand_made / "cat" / "catalog.csv")
  assert precision.pairs == 4 and precision.same_style == 3   # (a1,b1) share style id "A"


def test_cli_min_coclicks_override_and_beam_flags(hand_made, tmp_path, capsys):
  out = tmp_path / "pairs.csv"
  cli.mine_entry(["mining", f"--config={REPO / 'configs' / 'tiny.py'}",
                  f"--clicklog={hand_made / 'log.csv'}",
                  f"--catalog={hand_made / 'cat' / 'catalog.csv'}", f"--out={out}",
                  "--config.data.mining.min_coclicks=2",
                  "--config.data.mining.max_bad_fraction=1.0",
                  "--config.data.mining.write_rejects=False", "--precision",
                  "--direct_num_workers=1"])  # unknown to the CLI: passed on to Beam
  assert _pairs(out) == {("a1", "a2")}
  report = json.loads((tmp_path / "pairs.report.json").read_text())
  assert report["stages"]["dropped_min_coclicks"] == 1 and report["rows_read"] == 24
  assert not (tmp_path / "pairs.rejects.csv").exists()
  printed = capsys.readouterr().out
  assert "pairs written" in printed and "precision" in printed


def test_caps_per_query_and_per_listing(hand_made, tmp_path):
  rows = [_row("q1", p, lid, rel, 1) for p, (lid, rel) in
          enumerate([("c1", "0.99"), ("c2", "0.98"), ("c3", "0.97"), ("c4", "0.96")], 1)]
  # Hub h: co-clicked with x1 in two sessions, with x2 and x3 once each.
  for s, x in (("h1", "x1"), ("h2", "x1"), ("h3", "x2"), ("h4", "x3")):
    rows += [_row(s, 1, "h", "0.9", 1), _row(s, 2, x, "0.9", 1)]
  _write_log(tmp_path / "log.csv", rows)
  out = tmp_path / "pairs.csv"
  report = mining.mine_pairs(tmp_path / "log.csv", hand_made / "cat" / "catalog.csv", out,
                             _cfg(max_pairs_per_query=1, max_pairs_per_listing=1),
                             verbose=False)
  # q1's 6 pairs -> the one with the highest min relevance; h keeps its strongest pair.
  assert _pairs(out) == {("c1", "c2"), ("h", "x1")}
  assert report.stages["dropped_query_cap"] == 5
  assert report.stages["dropped_listing_cap"] == 2


def test_group_by_query_text_and_group_size_cap(hand_made, tmp_path):
  # One query text (up to case and spacing) issued in three sessions, one click each.
  rows = [_row("s1", 1, "a1", "0.95", 1, query="Red Mug"),
          _row("s2", 1, "a2", "0.90", 1, query="red  mug"),
          _row("s3", 1, "a5", "0.85", 1, query="red mug"),
          _row("s4", 1, "a6", "0.90", 1, query="blue mug")]
  _write_log(tmp_path / "log.csv", rows)
  out = tmp_path / "pairs.csv"
  report = mining.mine_pairs(tmp_path / "log.csv", hand_made / "cat" / "catalog.csv", out,
                             _cfg(group_by="query", max_listings_per_group=2), verbose=False)
  # The two most relevant listings of "red mug" are paired; a5 is cut (2 pairs dropped).
  assert _pairs(out) == {("a1", "a2")}
  assert report.stages["dropped_group_size"] == 2 and report.stages["candidates"] == 3


def test_strict_names_file_and_row_and_writes_nothing(hand_made, tmp_path):
  out = tmp_path / "pairs.csv"
  where = _byte_where(hand_made / "log.csv", 14)
  with pytest.raises(DataError, match=re.escape(f"{where}: wrong_column_count")):
    mining.mine_pairs(hand_made / "log.csv", hand_made / "cat" / "catalog.csv", out,
                      _cfg(strict=True), verbose=False)
  assert list(tmp_path.iterdir()) == []


def test_too_many_bad_rows_stops_with_a_clear_message(hand_made, tmp_path):
  out = tmp_path / "pairs.csv"
  with pytest.raises(DataError, match=r"12 of 24 rows were bad .* max_bad_fraction=0\.2"):
    mining.mine_pairs(hand_made / "log.csv", hand_made / "cat" / "catalog.csv", out,
                      _cfg(max_bad_fraction=0.2), verbose=False)
  assert not out.exists()


def test_missing_files_and_headers_fail_before_running(hand_made, tmp_path):
  cat = hand_made / "cat" / "catalog.csv"
  with pytest.raises(DataError, match="no such file"):
    mining.mine_pairs(tmp_path / "nope.csv", cat, tmp_path / "o.csv", _cfg())
  (tmp_path / "short.csv").write_text("session_id,query,listing_id\ns,q,l\n")
  with pytest.raises(DataError, match=r"lacks required columns \['cate_lv1_name'"):
    mining.mine_pairs(tmp_path / "short.csv", cat, tmp_path / "o.csv", _cfg())
  with pytest.raises(ConfigError, match="min_relevance"):
    mining.mine_pairs(hand_made / "log.csv", cat, tmp_path / "o.csv", _cfg(min_relevance=2.0))


@pytest.mark.parametrize("values,reason", [
    (["s", "1", "q", "1", "l", "S", "I", "C", "0.5"], "wrong_column_count"),
    (["", "1", "q", "1", "l", "S", "I", "C", "0.5", "1"], "empty_id"),
    (["s", "1", " ", "1", "l", "S", "I", "C", "0.5", "1"], "empty_query"),
    (["s", "1.5", "q", "1", "l", "S", "I", "C", "0.5", "1"], "bad_number"),
    (["s", "1", "q", "-2", "l", "S", "I", "C", "0.5", "1"], "bad_number"),
    (["s", "1", "q", "1", "l", "S", "I", "C", "NaN", "1"], "bad_relevance"),
    (["s", "1", "q", "1", "l", "S", "I", "C", "inf", "1"], "bad_relevance"),
    (["s", "1", "q", "1", "l", "S", "I", "C", "-0.1", "1"], "bad_relevance"),
    (["s", "1", "q", "1", "l", "S", "I", "C", "high", "1"], "bad_relevance"),
    (["s", "1", "q", "1", "l", "S", "I", "C", "0.5", "2"], "bad_clicked"),
    (["s", "1", "q", "1", "l", "S", "I", "X", "0.5", "1"], "unknown_category"),
])
def test_parse_click_rejects_each_bad_value(values, reason):
  index = {name: i for i, name in enumerate(HEADER)}
  parsed = clicklog.parse_click(values, index, len(HEADER), frozenset({("I", "C")}))
  assert isinstance(parsed, clicklog.BadRow) and parsed.reason == reason


def test_parse_click_accepts_typed_parquet_values():
  index = {name: i for i, name in enumerate(HEADER)}
  click = clicklog.parse_click(["s", 7, "Red  Mug", 2.0, "l", None, "I", "C", 1.0, True],
                               index, len(HEADER), frozenset({("I", "C")}))
  assert click == clicklog.Click("s", "Red  Mug", "l", "I", "C", 1.0, True, 2, 7, "")
  assert clicklog.normalize_query(click.query) == "red mug"


def test_plain_reader_counts_the_same_reasons_and_strict_names_the_line(hand_made):
  skips = SkipCounter("log")
  clicks = list(clicklog.read_clicklog(str(hand_made / "log.csv"),
                                       frozenset({MUG, SCREW}), skips))
  # The plain reader has no catalog, so unknown_listing / category_mismatch rows pass.
  assert len(clicks) == len(GOOD) + 2
  assert skips.reasons["duplicate_row"] == 1 and skips.reasons["bad_encoding"] == 1
  assert skips.reasons["bad_relevance"] == 2
  with pytest.raises(DataError, match=r"log\.csv:14: wrong_column_count"):
    list(clicklog.read_clicklog(str(hand_made / "log.csv"), skips=SkipCounter("x", strict=True)))


def test_precision_of_counts_same_style_pairs():
  p = precision_of([("M", "a", "b"), ("M", "a", "c"), ("S", "d", "e")],
                   {"a": "1", "b": "1", "c": "2", "d": "3", "e": "3"})
  assert (p.pairs, p.same_style) == (3, 2) and math.isclose(p.precision, 2 / 3)
  assert p.by_category == {"M": (2, 1), "S": (1, 1)}
  with pytest.raises(DataError):
    precision_of([("M", "a", "zz")], {"a": "1"})


def test_constraints_raise_precision_on_a_tiny_world(tmp_path):
  cfg = world_config("tiny")
  cfg.image_size = 16
  world = synthetic.generate_world(cfg, tmp_path / "world")
  on, off = tmp_path / "on.csv", tmp_path / "off.csv"
  mining.mine_pairs(world.clicklog, world.catalog, on, mining_config("tiny"), verbose=False)
  mining.mine_pairs(world.clicklog, world.catalog, off,
                    _cfg(category_constraint=False, relevance_constraint=False,
                         max_pairs_per_query=20, max_pairs_per_listing=30), verbose=False)
  p_on, p_off = pair_precision(on, world.catalog), pair_precision(off, world.catalog)
  assert p_on.pairs > 50 and p_off.pairs > p_on.pairs
  assert p_on.precision > p_off.precision + 0.15, (p_on.precision, p_off.precision)
  # Pairs point at real images, relative to the pair file's directory.
  first = next(read_pairs(on))
  assert (on.parent / first.trigger_img).is_file()
