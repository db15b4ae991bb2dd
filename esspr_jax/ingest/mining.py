"""Same-style pair mining from click logs: the paper's sampling skill, as a Beam pipeline.

Listings co-clicked under one query (one session by default) become candidate pairs. A
candidate is kept only if both listings are in the same leaf category (category
constraint) and both are relevant to the query (relevance constraint); then pairs are
capped per query, deduplicated across queries (unordered), filtered by a minimum
co-click count and capped per listing. Every stage is counted with Beam metrics and
returned as a `MiningReport`. Bad click-log rows are skipped by reason into
OUT.rejects.csv; `strict` turns the first one into an error, `max_bad_fraction` stops a
mostly-bad log. The output, in the eSSPR release format, is renamed into place only
after those checks pass, so a failed run never leaves a half-written pair file.

The same code runs on DirectRunner (default) or Dataflow/Flink/Spark: pass Beam pipeline
options (see docs/data.md). CLI:
  python -m esspr_jax.ingest.mining --config=configs/demo.py --clicklog=LOG --catalog=CAT \
      --out=PAIRS.csv [--config.data.mining.min_relevance=0.8] [--runner=... beam flags]
"""
import csv
import dataclasses
import io
import os
import re
import shlex
import sys
import time
import uuid
import zlib
from typing import NamedTuple, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from esspr_jax.ingest import catalog as catalog_lib
from esspr_jax.ingest import clicklog
from esspr_jax.ingest.release_format import FIELDS as PAIR_FIELDS
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.errors import DataError

NAMESPACE = "esspr_mining"
_KV = beam.typehints.Tuple[beam.typehints.Any, beam.typehints.Any]
REJECT_FIELDS = ("reason", "where", "detail")
# Pair-stage counters, in pipeline order; each dropped_* counts pairs one rule removed.
STAGES = ("candidates", "dropped_self_pair", "dropped_category", "dropped_relevance",
          "dropped_group_size", "dropped_query_cap", "merged_duplicates", "unique_pairs",
          "dropped_min_coclicks", "dropped_listing_cap", "pairs_written")


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


@dataclasses.dataclass
class MiningReport:
  rows_read: int
  impressions: int
  clicks: int
  skipped: dict
  stages: dict
  catalog_listings: int
  catalog_skipped: dict
  seconds: float
  output: str
  rejects: str | None

  @property
  def pairs_written(self) -> int:
    return self.stages["pairs_written"]

  @property
  def skipped_total(self) -> int:
    return sum(self.skipped.values())

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def table(self) -> str:
    lines = [f"{'stage':<28}{'count':>12}",
             f"{'rows read':<28}{self.rows_read:>12,}",
             f"{'  impressions (no click)':<28}{self.impressions:>12,}",
             f"{'  clicks':<28}{self.clicks:>12,}",
             f"{'  skipped (bad rows)':<28}{self.skipped_total:>12,}"]
    lines += [f"{'    ' + reason:<28}{n:>12,}" for reason, n in sorted(self.skipped.items())]
    lines += [f"{name.replace('_', ' '):<28}{n:>12,}" for name, n in self.stages.items()]
    lines.append(f"{'catalog listings':<28}{self.catalog_listings:>12,}")
    lines += [f"{'  catalog skipped ' + r:<28}{n:>12,}"
              for r, n in sorted(self.catalog_skipped.items())]
    lines.append(f"wrote {self.pairs_written:,} pairs to {self.output} in {self.seconds:.1f}s")
    return "\n".join(lines)


def _count(name: str, n: int = 1) -> None:
  if n:
    Metrics.counter(NAMESPACE, name).inc(n)


def _stable_hash(*parts) -> int:
  return zlib.crc32("\x1f".join(map(str, parts)).encode("utf-8"))


def _where_key(where: str):
  """Sorts 'file:12' after 'file:9'."""
  m = re.search(r"(\d+)$", where)
  return (where[:m.start()] if m else where, int(m.group(1)) if m else -1)


def _bad(reason: str, where: str, detail: str = ""):
  _count(f"skipped/{reason}")
  return beam.pvalue.TaggedOutput("bad", (reason, where, detail))


class ReadClicks(beam.DoFn):
  """One click-log file -> its clicked rows, as (dedupe key, (where, Click)).

  Impressions (clicked=0) are only counted. Bad rows go to the 'bad' output."""

  def __init__(self, input_format: str):
    self._format = input_format
    self._cats_src, self._cats = None, None

  def process(self, path, categories):
    if self._cats_src is not categories:
      self._cats_src, self._cats = categories, frozenset(tuple(c) for c in categories)
    header, rows = clicklog.read_raw_rows(path, self._format)
    index = clicklog.column_index(header, path)
    for where, values in rows:
      _count("rows_read")
      if values is None:
        yield _bad("bad_encoding", where)
        continue
      parsed = clicklog.parse_click(values, index, len(header), self._cats)
      if isinstance(parsed, clicklog.BadRow):
        yield _bad(parsed.reason, where, parsed.detail)
      elif not parsed.clicked:
        _count("impressions")
      else:
        _count("clicks")
        yield parsed.dedupe_key, (where, parsed)


def _drop_duplicate_rows(keyed):
  """Keeps the first (by file and row) of rows logged twice; the rest are bad rows."""
  _, rows = keyed
  rows = sorted(rows, key=lambda wc: _where_key(wc[0]))
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
    self._query_cap = int(cfg.max_pairs_per_query)
    self._group_cap = int(cfg.max_listings_per_group)
    self._seed = int(cfg.seed)

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
      merged.sort(key=lambda i: (-i.relevance, _stable_hash(self._seed, i.listing_id)))
      kept = merged[:self._group_cap]
      k = self._group_cap
      _count("candidates", n * (n - 1) // 2 - k * (k - 1) // 2)
      _count("dropped_group_size", n * (n - 1) // 2 - k * (k - 1) // 2)
      merged = sorted(kept, key=lambda i: i.listing_id)
    survivors, counts = [], {"candidates": 0, "dropped_category": 0, "dropped_relevance": 0}
    for i in range(len(merged)):
      for j in range(i + 1, len(merged)):
        a, b = merged[i], merged[j]
        counts["candidates"] += 1
        if self._category and (a.cate_lv1_name, a.cate_name) != (b.cate_lv1_name, b.cate_name):
          counts["dropped_category"] += 1
        elif self._relevance and min(a.relevance, b.relevance) < self._min_relevance:
          counts["dropped_relevance"] += 1
        else:
          survivors.append(Evidence(a, b, min(a.relevance, b.relevance), 1))
    for name, n in counts.items():
      _count(name, n)
    if self._query_cap and len(survivors) > self._query_cap:
      survivors.sort(key=lambda e: (-e.score, _stable_hash(self._seed, group, e.a.listing_id,
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
  return (-e.coclicks, -e.score, _stable_hash(seed, *pair))


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
  t, r = (e.a, e.b) if _stable_hash(seed, "side", a_id, b_id) % 2 == 0 else (e.b, e.a)
  _count("pairs_written")
  return _csv_line([t.cate_lv1_name, t.cate_name, t.listing_id, t.title, r.listing_id,
                    r.title, t.image, r.image, 1])


def _csv_line(values: Sequence) -> str:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="").writerow(values)
  return buf.getvalue()


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


def build_pipeline(p: beam.Pipeline, click_paths: Sequence[str], catalog_path: str,
                   out_tmp: str, rejects_tmp: str, cfg, input_format: str) -> None:
  """Adds the mining graph to `p`: click files -> pairs at out_tmp, rejects at rejects_tmp."""
  catalog = (p | "CatalogFile" >> beam.Create([catalog_path])
             | "ReadCatalog" >> beam.ParDo(ReadCatalog(ImagePaths(catalog_path, out_tmp))))
  categories = (catalog | "Categories" >> beam.Map(lambda kv: (kv[1][0], kv[1][1]))
                | "DistinctCategories" >> beam.Distinct())
  parsed = (p | "ClickFiles" >> beam.Create(list(click_paths))
            | "ReadClicks" >> beam.ParDo(ReadClicks(input_format),
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
    seed, cap = int(cfg.seed), int(cfg.max_pairs_per_listing)
    votes = (pairs
             | "ByListing" >> beam.FlatMap(
                 lambda kv, s: [(lid, (kv[0], _rank_key(kv[0], kv[1], s))) for lid in kv[0]],
                 seed)
             | "GroupByListing" >> beam.GroupByKey()
             | "ListingVotes" >> beam.FlatMap(_listing_votes, cap))
    pairs = ({"pair": pairs, "votes": votes} | "JoinVotes" >> beam.CoGroupByKey()
             | "ListingCap" >> beam.FlatMap(_keep_voted))
  (pairs | "Format" >> beam.Map(_format_pair, int(cfg.seed))
   | "WritePairs" >> beam.io.WriteToText(out_tmp, num_shards=1, shard_name_template="",
                                         header=",".join(PAIR_FIELDS)))
  ((parsed.bad, deduped.bad, joined.bad) | "AllBad" >> beam.Flatten()
   | "FormatBad" >> beam.Map(_csv_line)
   | "WriteRejects" >> beam.io.WriteToText(rejects_tmp, num_shards=1, shard_name_template="",
                                           header=",".join(REJECT_FIELDS)))


def expand_paths(spec) -> list[str]:
  """A path, a glob, a comma list or a list of those -> the sorted matching files."""
  specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  out = []
  for s in specs:
    for part in str(s).split(","):
      part = part.strip()
      if not part:
        continue
      matched = FileSystems.match([part])[0].metadata_list
      if not matched:
        raise DataError(f"click log {part!r}: no such file")
      out.extend(m.path for m in matched)
  if not out:
    raise DataError(f"no click-log files in {spec!r}")
  return sorted(set(out))


def _read_counters(result) -> dict:
  counters = {}
  for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
    value = c.committed if c.committed is not None else c.attempted
    counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + int(value or 0)
  return counters


def _prefixed(counters: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix) and v}


def _first_reject(path: str) -> tuple:
  with FileSystems.open(path) as f:
    rows = list(csv.reader(io.TextIOWrapper(f, encoding="utf-8")))[1:]
  return min((tuple(r) for r in rows if len(r) == 3), key=lambda r: _where_key(r[1]),
             default=("?", "?", ""))


def _rejects_path(out: str) -> str:
  return (out[:-4] if out.endswith(".csv") else out) + ".rejects.csv"


def _move(src: str, dst: str) -> None:
  if "://" in src or "://" in dst:
    if FileSystems.exists(dst):
      FileSystems.delete([dst])
    FileSystems.rename([src], [dst])
  else:
    os.replace(src, dst)


def _remove(path: str) -> None:
  if FileSystems.exists(path):
    FileSystems.delete([path])


def pipeline_options(cfg, extra_args: Sequence[str] = ()) -> PipelineOptions:
  """--runner from the config, then config extras, then the command line (last wins)."""
  return PipelineOptions([f"--runner={cfg.runner}", *shlex.split(cfg.pipeline_options),
                          *extra_args])


def mine_pairs(clicklog_path, catalog_path, out_csv, cfg,
               beam_args: Sequence[str] = (), verbose: bool = True) -> MiningReport:
  """Mines release-format same-style pairs from click logs into out_csv (see module doc).

  clicklog_path: a file, glob, comma list or list of them (CSV or Parquet).
  Raises DataError for a missing file or header, in strict mode for the first bad row,
  and when more than cfg.max_bad_fraction of the rows read were bad.
  """
  # Imported here: the config package pulls in JAX, which Beam workers do not need.
  from esspr_jax.config.data import validate_mining  # pylint: disable=import-outside-toplevel
  validate_mining(cfg)
  paths = expand_paths(clicklog_path)
  catalog_path, out = str(catalog_path), str(out_csv)
  if not FileSystems.exists(catalog_path):
    raise DataError(f"catalog {catalog_path!r}: no such file")
  for path in paths:  # a wrong header is a wrong file, not a bad row: fail before running
    clicklog.column_index(clicklog.read_header(path, cfg.input_format), path)
  clicklog.require_some_rows(paths, cfg.input_format)  # header-only: an error, not 0 pairs
  if "://" not in out:
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  out_tmp, rejects_tmp = f"{out}.tmp-{tag}", f"{_rejects_path(out)}.tmp-{tag}"
  start = time.perf_counter()
  try:
    p = beam.Pipeline(options=pipeline_options(cfg, beam_args))
    build_pipeline(p, paths, catalog_path, out_tmp, rejects_tmp, cfg, cfg.input_format)
    result = p.run()
    result.wait_until_finish()
    counters = _read_counters(result)
    report = MiningReport(
        rows_read=counters.get("rows_read", 0), impressions=counters.get("impressions", 0),
        clicks=counters.get("clicks", 0), skipped=_prefixed(counters, "skipped/"),
        stages={s: counters.get(s, 0) for s in STAGES},
        catalog_listings=counters.get("catalog_listings", 0),
        catalog_skipped=_prefixed(counters, "catalog_skipped/"),
        seconds=time.perf_counter() - start, output=out,
        rejects=_rejects_path(out) if cfg.write_rejects else None)
    if cfg.strict and report.skipped_total:
      reason, where, detail = _first_reject(rejects_tmp)
      raise DataError(f"click log (strict): {where}: {reason}{': ' + detail if detail else ''} "
                      f"({report.skipped_total} bad rows in all)")
    skips = SkipCounter(f"click log {', '.join(paths)}",
                        max_bad_fraction=cfg.max_bad_fraction)
    skips.seen = report.rows_read
    skips.reasons.update(report.skipped)
    skips.check_fraction()
    _move(out_tmp, out)
    if cfg.write_rejects:
      _move(rejects_tmp, report.rejects)
  finally:
    _remove(out_tmp)
    _remove(rejects_tmp)
  if verbose:
    print(report.table())
  return report


def main(argv=None) -> int:
  """`python -m esspr_jax.ingest.mining` is `esspr-jax --mode=mine` (one entry point and
  one error handling, esspr_jax/cli.py); flags that command does not know go to Beam."""
  from esspr_jax import cli  # pylint: disable=import-outside-toplevel
  return cli.mine_entry(list(sys.argv if argv is None else argv))


if __name__ == "__main__":
  sys.exit(main())
