"""The mining pipeline's types, DoFns and graph, in a module workers can import.

Everything a Beam worker runs lives here, never in the module that runs as `__main__`:
a remote (or multi_processing) worker unpickles DoFns and elements by module path, and
`__main__` on the worker is the worker itself (`python -m esspr_jax.ingest.mining` used
to fail with `PicklingError: Can't pickle <class '__main__.Item'>`). This module imports
only Beam and the ingest readers, not JAX.

Graph: click-log sources (split by byte range / row group) -> ParseClicks -> drop
duplicate rows -> join the catalog -> group by query -> CandidatePairs (constraints and
the query cap) -> merge duplicates across queries -> per-listing cap -> sharded text
output. Every stage counts into Beam metrics (namespace NAMESPACE); bad rows go to a
'bad' output written as rejects.
"""
import csv
import io
import os
import re
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from esspr_jax.ingest import catalog as catalog_lib
from esspr_jax.ingest import clicklog, clicklog_source
from esspr_jax.ingest.release_format import FIELDS as PAIR_FIELDS
from esspr_jax.ingest.skips import SkipCounter

NAMESPACE = "esspr_mining"
_KV = beam.typehints.Tuple[beam.typehints.Any, beam.typehints.Any]
REJECT_FIELDS = ("reason", "where", "detail")
# Pair-stage counters, in pipeline order; each dropped_* counts pairs one rule removed.
STAGES = ("candidates", "dropped_self_pair", "dropped_category", "dropped_relevance",
          "dropped_title_overlap", "dropped_group_size", "dropped_query_cap",
          "merged_duplicates", "unique_pairs", "dropped_min_coclicks", "dropped_listing_cap",
          "pairs_written")
# Bad-row reasons only the split reader has (the rest are clicklog.REASONS).
READER_REASONS = ("bad_csv",)


class Item(NamedTuple):
  """A clicked listing under one query, joined with its catalog entry."""
  listing_id: str
  cate_lv1_name: str
  cate_name: str
  relevance: float
  title: str
  image: str


class Evidence(NamedTuple):
  a: Item
  b: Item
  score: float      # the lower of the two relevances
  coclicks: int     # number of groups (queries) that produced the pair


def _count(name: str, n: int = 1) -> None:
  if n:
    Metrics.counter(NAMESPACE, name).inc(n)


def stable_hash(*parts) -> int:
  return zlib.crc32("\x1f".join(map(str, parts)).encode("utf-8"))


def where_key(where: str):
  """Sorts 'file:byte 12' after 'file:byte 9'."""
  m = re.search(r"(\d+)$", where)
  return (where[:m.start()] if m else where, int(m.group(1)) if m else -1)


def _bad(reason: str, where: str, detail: str = ""):
  _count(f"skipped/{reason}")
  return beam.pvalue.TaggedOutput("bad", (reason, where, detail))


_TOKEN = re.compile(r"[0-9a-z]+")


def title_tokens(title: str) -> frozenset:
  """Lower-case letter/digit runs: 'M6 x 40mm' -> {m6, x, 40mm}."""
  return frozenset(_TOKEN.findall(title.lower()))


def title_overlap(a: str, b: str) -> float:
  """Jaccard overlap of two titles' token sets (0 when either has no tokens)."""
  ta, tb = title_tokens(a), title_tokens(b)
  return len(ta & tb) / len(ta | tb) if ta and tb else 0.0


class ParseClicks(beam.DoFn):
  """(path, position, raw line or values) -> clicked rows as (dedupe key, (where, Click)).

  Impressions (clicked=0) are only counted; bad rows go to the 'bad' output. Each file's
  header is read once per worker (files may order their columns differently)."""

  def __init__(self, input_format: str):
    self._format = input_format
    self._headers = {}
    self._cats_src, self._cats = None, None

  def _header(self, path: str) -> tuple:
    if path not in self._headers:
      header = clicklog.read_header(path, self._format)
      self._headers[path] = (clicklog.column_index(header, path), len(header))
    return self._headers[path]

  def process(self, record, categories):
    if self._cats_src is not categories:
      self._cats_src, self._cats = categories, frozenset(tuple(c) for c in categories)
    path, position, payload = record
    if isinstance(payload, bytes) and not payload.strip():
      return []  # a blank line is not a row
    _count("rows_read")
    where, values = self._values(path, position, payload)
    if isinstance(values, clicklog.BadRow):
      return [_bad(values.reason, where, values.detail)]
    index, num_columns = self._header(path)
    parsed = clicklog.parse_click(values, index, num_columns, self._cats)
    if isinstance(parsed, clicklog.BadRow):
      return [_bad(parsed.reason, where, parsed.detail)]
    if not parsed.clicked:
      _count("impressions")
      return []
    _count("clicks")
    return [(parsed.dedupe_key, (where, parsed))]

  @staticmethod
  def _values(path: str, position: int, payload):
    """(where, field values) of one record, or (where, BadRow) for an unreadable line."""
    if not isinstance(payload, bytes):
      return clicklog_source.parquet_where(path, position), payload
    where = clicklog_source.csv_where(path, position)
    try:
      return where, next(csv.reader([payload.decode("utf-8")]))
    except UnicodeDecodeError:
      return where, clicklog.BadRow("bad_encoding", "")
    except csv.Error as e:
      return where, clicklog.BadRow("bad_csv", str(e))


def _drop_duplicate_rows(keyed):
  """Keeps the first (by file and position) of rows logged twice; the rest are bad rows."""
  _, rows = keyed
  rows = sorted(rows, key=lambda wc: where_key(wc[0]))
  where, click = rows[0]
  for dup_where, _ in rows[1:]:
    yield _bad("duplicate_row", dup_where, f"same session, position and listing as {where}")
  yield click.listing_id, (where, click)


class ReadCatalog(beam.DoFn):
  """A catalog file -> (listing_id, (lv1, leaf, title, image path as the output sees it))."""

  def __init__(self, image_base: "ImagePaths"):
    self._paths = image_base

  def process(self, path):
    skips = SkipCounter(f"catalog {path}")
    for x in catalog_lib.iter_catalog(path, skips):
      yield x.listing_id, (x.cate_lv1_name, x.cate_name, x.title, self._paths(x.image))
    for reason, n in skips.reasons.items():
      _count(f"catalog_skipped/{reason}", n)
    _count("catalog_listings", skips.seen - skips.skipped)


def _join_catalog(joined, group_by: str):
  """Clicks of one listing + its catalog entry -> (group key, Item) per click."""
  _, grouped = joined
  entries = sorted(grouped["listing"])
  for where, click in grouped["click"]:
    if not entries:
      yield _bad("unknown_listing", where, click.listing_id)
      continue
    lv1, leaf, title, image = entries[0]
    if (lv1, leaf) != (click.cate_lv1_name, click.cate_name):
      yield _bad("category_mismatch", where,
                 f"log says {click.cate_name!r}, catalog says {leaf!r}")
      continue
    key = click.session_id if group_by == "session" else clicklog.normalize_query(click.query)
    yield key, Item(click.listing_id, lv1, leaf, click.relevance, title, image)


class CandidatePairs(beam.DoFn):
  """All clicks under one query -> the pairs that pass the constraints and the query cap."""

  def __init__(self, cfg):
    self._category = bool(cfg.category_constraint)
    self._relevance = bool(cfg.relevance_constraint)
    self._min_relevance = float(cfg.min_relevance)
    self._min_overlap = float(cfg.get("min_title_overlap", 0.0))
    self._query_cap = int(cfg.max_pairs_per_query)
    self._group_cap = int(cfg.max_listings_per_group)
    self._seed = int(cfg.seed)

  def _rule_dropping(self, a: Item, b: Item) -> str | None:
    """The first constraint the pair fails (the counter it goes to), or None."""
    if self._category and (a.cate_lv1_name, a.cate_name) != (b.cate_lv1_name, b.cate_name):
      return "dropped_category"
    if self._relevance and min(a.relevance, b.relevance) < self._min_relevance:
      return "dropped_relevance"
    if self._min_overlap and title_overlap(a.title, b.title) < self._min_overlap:
      return "dropped_title_overlap"
    return None

  def process(self, keyed):
    group, items = keyed
    by_listing = {}
    for item in items:
      by_listing.setdefault(item.listing_id, []).append(item)
    repeats = sum(len(v) - 1 for v in by_listing.values())
    # A listing clicked more than once here would pair with itself.
    _count("candidates", repeats)
    _count("dropped_self_pair", repeats)
    merged = []
    for lid in sorted(by_listing):
      its = by_listing[lid]
      mean_rel = sum(i.relevance for i in its) / len(its)
      merged.append(its[0]._replace(relevance=mean_rel))
    n = len(merged)
    if self._group_cap and n > self._group_cap:
      merged.sort(key=lambda i: (-i.relevance, stable_hash(self._seed, i.listing_id)))
      kept = merged[:self._group_cap]
      k = self._group_cap
      _count("candidates", n * (n - 1) // 2 - k * (k - 1) // 2)
      _count("dropped_group_size", n * (n - 1) // 2 - k * (k - 1) // 2)
      merged = sorted(kept, key=lambda i: i.listing_id)
    survivors, counts = [], {"candidates": 0}
    for i in range(len(merged)):
      for j in range(i + 1, len(merged)):
        a, b = merged[i], merged[j]
        counts["candidates"] += 1
        rule = self._rule_dropping(a, b)
        if rule:
          counts[rule] = counts.get(rule, 0) + 1
        else:
          survivors.append(Evidence(a, b, min(a.relevance, b.relevance), 1))
    for name, n in counts.items():
      _count(name, n)
    if self._query_cap and len(survivors) > self._query_cap:
      survivors.sort(key=lambda e: (-e.score, stable_hash(self._seed, group, e.a.listing_id,
                                                          e.b.listing_id)))
      _count("dropped_query_cap", len(survivors) - self._query_cap)
      survivors = survivors[:self._query_cap]
    for e in survivors:
      yield (e.a.listing_id, e.b.listing_id), e


def _merge_duplicates(keyed, min_coclicks: int):
  """All groups' evidence for one unordered pair -> one Evidence with its co-click count."""
  pair, evidence = keyed
  evidence = list(evidence)
  _count("merged_duplicates", len(evidence) - 1)
  _count("unique_pairs")
  if len(evidence) < min_coclicks:
    _count("dropped_min_coclicks")
    return
  best = max(evidence, key=lambda e: e.score)
  yield pair, best._replace(coclicks=len(evidence))


def _rank_key(pair, e: Evidence, seed: int):
  return (-e.coclicks, -e.score, stable_hash(seed, *pair))


def _by_listing(keyed, seed: int):
  pair, e = keyed
  return [(lid, (pair, _rank_key(pair, e, seed))) for lid in pair]


def _listing_votes(keyed, cap: int):
  """One listing's pairs -> a vote for each of its `cap` strongest pairs."""
  _, ranked = keyed
  for pair, _ in sorted(ranked, key=lambda pr: pr[1])[:cap]:
    yield pair, 1


def _keep_voted(joined):
  """A pair survives the per-listing cap only if both of its listings voted for it."""
  pair, grouped = joined
  evidence = list(grouped["pair"])
  if sum(grouped["votes"]) < 2:
    _count("dropped_listing_cap")
    return
  yield pair, evidence[0]


def _format_pair(keyed, seed: int) -> str:
  (a_id, b_id), e = keyed
  t, r = (e.a, e.b) if stable_hash(seed, "side", a_id, b_id) % 2 == 0 else (e.b, e.a)
  _count("pairs_written")
  return csv_line([t.cate_lv1_name, t.cate_name, t.listing_id, t.title, r.listing_id,
                   r.title, t.image, r.image, 1])


def csv_line(values: Sequence) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="").writerow(values)
  return buf.getvalue()


def _categories(kv):
  return kv[1][0], kv[1][1]


class ImagePaths:
  """Catalog image path -> the path written to the pair file.

  Relative catalog paths resolve against the catalog's directory and are rewritten
  relative to the output's directory, so the pair file works from where it lies. URLs
  and absolute paths pass through."""

  def __init__(self, catalog_path: str, out_path: str):
    self._local = "://" not in catalog_path and "://" not in out_path
    self._cat_dir = os.path.dirname(os.path.abspath(catalog_path)) if self._local else ""
    self._out_dir = os.path.dirname(os.path.abspath(out_path)) if self._local else ""

  def __call__(self, image: str) -> str:
    if not self._local or not image or "://" in image or os.path.isabs(image):
      return image
    return os.path.relpath(os.path.join(self._cat_dir, image), self._out_dir)


class ClickSource(NamedTuple):
  """One click-log pattern and how to read it ('csv' or 'parquet')."""
  pattern: str
  fmt: str


def read_click_logs(p: beam.Pipeline, sources: Sequence[ClickSource]):
  """Splittable reads of every pattern, flattened into one PCollection of records."""
  reads = []
  for i, src in enumerate(sources):
    source_cls = (clicklog_source.ParquetRows if src.fmt == "parquet"
                  else clicklog_source.CsvLines)
    reads.append(p | f"ReadClickLog{i}" >> beam.io.Read(source_cls(src.pattern)))
  return reads[0] if len(reads) == 1 else tuple(reads) | "AllClickLogs" >> beam.Flatten()


def build_pipeline(p: beam.Pipeline, sources: Sequence[ClickSource], catalog_path: str,
                   out_prefix: str, out_suffix: str, rejects_tmp: str, cfg,
                   image_base: str) -> None:
  """Adds the mining graph to `p`: click logs -> pair shards at out_prefix*out_suffix
  (`cfg.num_shards`; 0 lets the runner choose), rejects in one file at rejects_tmp.
  Image paths are rewritten relative to the directory of `image_base` (the final output)."""
  catalog = (p | "CatalogFile" >> beam.Create([catalog_path])
             | "ReadCatalog" >> beam.ParDo(ReadCatalog(ImagePaths(catalog_path, image_base))))
  categories = (catalog | "Categories" >> beam.Map(_categories)
                | "DistinctCategories" >> beam.Distinct())
  parsed = (read_click_logs(p, sources)
            | "ParseClicks" >> beam.ParDo(ParseClicks(cfg.input_format),
                                          beam.pvalue.AsList(categories))
            .with_output_types(_KV).with_outputs("bad", main="clicks"))
  deduped = (parsed.clicks | "GroupDuplicates" >> beam.GroupByKey()
             | "DropDuplicates" >> beam.FlatMap(_drop_duplicate_rows)
             .with_output_types(_KV).with_outputs("bad", main="clicks"))
  joined = ({"click": deduped.clicks, "listing": catalog} | "JoinCatalog" >> beam.CoGroupByKey()
            | "CheckCatalog" >> beam.FlatMap(_join_catalog, cfg.group_by)
            .with_output_types(_KV).with_outputs("bad", main="items"))
  pairs = (joined.items | "GroupByQuery" >> beam.GroupByKey()
           | "CandidatePairs" >> beam.ParDo(CandidatePairs(cfg))
           | "GroupPairs" >> beam.GroupByKey()
           | "MergeDuplicates" >> beam.FlatMap(_merge_duplicates, int(cfg.min_coclicks)))
  if cfg.max_pairs_per_listing:
    votes = (pairs
             | "ByListing" >> beam.FlatMap(_by_listing, int(cfg.seed))
             | "GroupByListing" >> beam.GroupByKey()
             | "ListingVotes" >> beam.FlatMap(_listing_votes, int(cfg.max_pairs_per_listing)))
    pairs = ({"pair": pairs, "votes": votes} | "JoinVotes" >> beam.CoGroupByKey()
             | "ListingCap" >> beam.FlatMap(_keep_voted))
  num_shards = int(cfg.get("num_shards", 1))
  (pairs | "Format" >> beam.Map(_format_pair, int(cfg.seed))
   | "WritePairs" >> beam.io.WriteToText(
       out_prefix, file_name_suffix=out_suffix, num_shards=num_shards,
       shard_name_template="" if num_shards == 1 else None, header=",".join(PAIR_FIELDS)))
  ((parsed.bad, deduped.bad, joined.bad) | "AllBad" >> beam.Flatten()
   | "FormatBad" >> beam.Map(csv_line)
   | "WriteRejects" >> beam.io.WriteToText(rejects_tmp, num_shards=1, shard_name_template="",
                                           header=",".join(REJECT_FIELDS)))
