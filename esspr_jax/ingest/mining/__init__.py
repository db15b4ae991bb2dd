"""Same-style pair mining from click logs: the paper's sampling skill, as a Beam pipeline.

Listings co-clicked under one query (one session by default) become candidate pairs. A
candidate is kept only if both listings are in the same leaf category (category
constraint), both are relevant to the query (relevance constraint) and, optionally, their
titles share enough words (title agreement, `min_title_overlap`); then pairs are capped
per query, deduplicated across queries (unordered), filtered by a minimum co-click count
and capped per listing. Every stage is counted with Beam metrics and returned as a
`MiningReport`. Bad click-log rows are skipped by reason into OUT.rejects.csv; `strict`
turns the first one into an error, `max_bad_fraction` stops a mostly-bad log. The
output, in the eSSPR release format, is renamed into place only after those checks
pass, so a failed run never leaves a half-written pair file.

This package is only the launcher (`__main__.py` is its command line, docs/data.md its
usage): the graph, its types and DoFns are in mining_graph (importable by workers), the
splittable click-log reads in clicklog_source. The same code runs on the local runner
(default; beam_local.LocalRunner: Beam's FnApiRunner, its servers on loopback) or
Dataflow/Flink/Spark, given Beam pipeline options. Output is sharded by `num_shards`
(0 = the runner decides; one shard is written as OUT itself); pair_files reads OUT, its
shards or any glob.
"""
import csv
import dataclasses
import io
import os
import shlex
import time
import uuid
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from esspr_jax.config.data import validate_mining
from esspr_jax.errors import DataError
from esspr_jax.ingest import beam_local, clicklog, pair_files
from esspr_jax.ingest.mining_graph import (
  NAMESPACE,
  STAGES,
  ClickSource,
  build_pipeline,
  where_key,
)
from esspr_jax.ingest.skips import SkipCounter


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
  output: str            # OUT itself, or the glob of its shards
  rejects: str | None
  output_files: list = dataclasses.field(default_factory=list)

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


def _spec_parts(spec) -> list[str]:
  specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  return [part.strip() for s in specs for part in str(s).split(",") if part.strip()]


def _match(part: str) -> list[str]:
  matched = FileSystems.match([part])[0].metadata_list
  if not matched:
    raise DataError(f"click log {part!r}: no such file")
  return sorted(m.path for m in matched)


def expand_paths(spec) -> list[str]:
  """A path, a glob, a comma list or a list of those -> the sorted matching files."""
  out = [path for part in _spec_parts(spec) for path in _match(part)]
  if not out:
    raise DataError(f"no click-log files in {spec!r}")
  return sorted(set(out))


def click_sources(spec, input_format: str) -> tuple[list[ClickSource], list[str]]:
  """One splittable source per pattern of `spec` (format by extension unless given),
  and every file they match. A pattern matching both CSV and Parquet files is refused."""
  sources, files = [], []
  for part in _spec_parts(spec):
    matched = _match(part)
    formats = {clicklog.detect_format(path, input_format) for path in matched}
    if len(formats) > 1:
      raise DataError(f"click log {part!r} matches both CSV and Parquet files; "
                      "give one pattern per format")
    sources.append(ClickSource(part, formats.pop()))
    files.extend(matched)
  if not files:
    raise DataError(f"no click-log files in {spec!r}")
  return sources, sorted(set(files))


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
  return min((tuple(r) for r in rows if len(r) == 3), key=lambda r: where_key(r[1]),
             default=("?", "?", ""))


def _rejects_path(out: str) -> str:
  return (out.removesuffix(".csv")) + ".rejects.csv"


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


def _matching(pattern: str) -> list[str]:
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _publish_pairs(tmp_prefix: str, out: str, num_shards: int) -> list[str]:
  """Moves the written shards into place and returns the final files. Earlier output at
  OUT (or earlier shards of it) is removed first, so a glob never mixes two runs."""
  prefix, suffix = pair_files.split_out(out)
  written = ([f"{tmp_prefix}{suffix}"] if num_shards == 1
             else _matching(pair_files.shard_glob(tmp_prefix + suffix)))
  for old in _matching(pair_files.shard_glob(out)) + ([out] if FileSystems.exists(out) else []):
    FileSystems.delete([old])
  if len(written) == 1:
    _move(written[0], out)
    return [out]
  final = [prefix + path[len(tmp_prefix):] for path in written]
  for src, dst in zip(written, final):
    _move(src, dst)
  return final


def pipeline_options(cfg, extra_args: Sequence[str] = ()) -> PipelineOptions:
  """--runner from the config, then config extras, then the command line (last wins).

  A local runner name (DirectRunner, ...) becomes beam_local.LocalRunner: the same
  Python runner DirectRunner uses for batch, without its Prism download and with its
  servers on loopback."""
  options = PipelineOptions([f"--runner={cfg.runner}", *shlex.split(cfg.pipeline_options),
                             *extra_args])
  standard = options.view_as(StandardOptions)
  if beam_local.is_local(standard.runner or "DirectRunner"):
    standard.runner = beam_local.LOCAL_RUNNER_PATH
  return options


def mine_pairs(clicklog_path, catalog_path, out_csv, cfg,
               beam_args: Sequence[str] = (), verbose: bool = True) -> MiningReport:
  """Mines release-format same-style pairs from click logs into out_csv (see module doc).

  clicklog_path: a file, glob, comma list or list of them (CSV or Parquet).
  Raises DataError for a missing file or header, in strict mode for the first bad row,
  and when more than cfg.max_bad_fraction of the rows read were bad.
  """
  # Imported here: the config package pulls in JAX, which Beam workers do not need.
  validate_mining(cfg)
  sources, paths = click_sources(clicklog_path, cfg.input_format)
  catalog_path, out = str(catalog_path), str(out_csv)
  if not FileSystems.exists(catalog_path):
    raise DataError(f"catalog {catalog_path!r}: no such file")
  for path in paths:  # a wrong header is a wrong file, not a bad row: fail before running
    clicklog.column_index(clicklog.read_header(path, cfg.input_format), path)
  clicklog.require_some_rows(paths, cfg.input_format)  # header-only: an error, not 0 pairs
  if "://" not in out:
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  prefix, suffix = pair_files.split_out(out)
  tmp_prefix, rejects_tmp = f"{prefix}.tmp-{tag}", f"{_rejects_path(out)}.tmp-{tag}"
  num_shards = int(cfg.num_shards)
  start = time.perf_counter()
  try:
    p = beam.Pipeline(options=pipeline_options(cfg, beam_args))
    build_pipeline(p, sources, catalog_path, tmp_prefix, suffix, rejects_tmp, cfg,
                   image_base=out)
    result = p.run()
    result.wait_until_finish()
    counters = _read_counters(result)
    report = MiningReport(
        rows_read=counters.get("rows_read", 0), impressions=counters.get("impressions", 0),
        clicks=counters.get("clicks", 0), skipped=_prefixed(counters, "skipped/"),
        stages={s: counters.get(s, 0) for s in STAGES},
        catalog_listings=counters.get("catalog_listings", 0),
        catalog_skipped=_prefixed(counters, "catalog_skipped/"),
        seconds=0.0, output=out,
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
    report.output_files = _publish_pairs(tmp_prefix, out, num_shards)
    if len(report.output_files) > 1:
      report.output = f"{prefix}-*-of-{len(report.output_files):05d}{suffix}"
    if cfg.write_rejects:
      _move(rejects_tmp, report.rejects)
    report.seconds = time.perf_counter() - start
  finally:
    for leftover in _matching(f"{tmp_prefix}*") + [rejects_tmp]:
      _remove(leftover)
  if verbose:
    print(report.table())
  return report
