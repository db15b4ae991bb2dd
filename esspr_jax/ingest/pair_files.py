"""Pair files as one input: a file, a glob, a comma list, or a mining output's shards.

Mining writes `OUT` itself when its output is one file and `STEM-SSSSS-of-NNNNN.csv`
shards next to it otherwise (`shard_glob(OUT)`), so every reader of pairs takes the
same `--out` path the miner was given, or any glob. Rows read through `read_pairs` are
numbered as lines of the files concatenated in name order (each file's header is a
line), so `source_row` stays unique across shards; `locate` turns one back into its
file and line.
"""
import dataclasses
import glob
import os
import pathlib
from collections.abc import Iterator

from esspr_jax.errors import DataError
from esspr_jax.ingest import release_format
from esspr_jax.ingest.skips import SkipCounter

_GLOB_CHARS = "*?["


def split_out(out: str) -> tuple[str, str]:
  """'dir/train_pairs.csv' -> ('dir/train_pairs', '.csv'): shard prefix and suffix."""
  return (out[:-4], ".csv") if out.endswith(".csv") else (out, "")


def shard_glob(out: str) -> str:
  """The names mining gives the shards of output `out`."""
  prefix, suffix = split_out(str(out))
  return f"{prefix}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]{suffix}"


def expand(spec) -> list[pathlib.Path]:
  """The pair files `spec` names, sorted; DataError naming `spec` if there are none.

  spec: a path, a glob, a comma list of those, or a mining `--out` whose output was
  sharded (then its shards)."""
  files = []
  for part in (p.strip() for p in str(spec).split(",")):
    if not part:
      continue
    if any(c in part for c in _GLOB_CHARS):
      matched = sorted(p for p in glob.glob(part) if os.path.isfile(p))
    elif os.path.isfile(part):
      matched = [part]
    else:
      matched = sorted(glob.glob(shard_glob(part)))
    if not matched:
      raise DataError(f"pair file not found: {part}"
                      + ("" if part == str(spec) else f" (in {spec})"))
    files.extend(matched)
  if not files:
    raise DataError(f"pair file not found: {spec!r}")
  return [pathlib.Path(f) for f in dict.fromkeys(files)]


def _line_count(path: pathlib.Path) -> int:
  """Lines as the CSV reader counts them (a last line without a newline counts)."""
  with open(path, "rb") as f:
    return sum(1 for _ in f)


def read_pairs(spec, skips: SkipCounter | None = None) -> Iterator[release_format.PairRow]:
  """release_format.read_pairs over every file of `spec`, rows numbered across files."""
  files = expand(spec)
  skips = skips or SkipCounter(f"pairs {spec}")
  offset = 0
  for i, path in enumerate(files):
    for row in release_format.read_pairs(path, skips):
      yield row if not offset else _renumbered(row, offset)
    if i + 1 < len(files):
      offset += _line_count(path)


def _renumbered(row: release_format.PairRow, offset: int) -> release_format.PairRow:
  return dataclasses.replace(row, source_row=row.source_row + offset)


def locate(spec, source_row: int) -> tuple[pathlib.Path, int]:
  """(file, line in that file) of a `source_row` that read_pairs(spec) produced."""
  for path in expand(spec):
    n = _line_count(path)
    if source_row <= n:
      return path, source_row
    source_row -= n
  raise DataError(f"{spec}: row {source_row} is past the end of its files")
