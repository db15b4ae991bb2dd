"""The click-log schema and a row reader that skips and counts bad rows.

One row is one search result shown to a user (an impression), `clicked` says whether it
was clicked. Columns (CSV with a header, or Parquet with these column names; any order,
extra columns ignored):

  session_id     required  one issue of a query by a user (the unit of co-clicking)
  query          required  the query text
  listing_id     required  the listing shown
  cate_lv1_name  required  its top-level category (industry)
  cate_name      required  its leaf category
  relevance      required  query-item relevance score in [0, 1]
  clicked        required  0/1 (also true/false)
  position       optional  1-based rank in the result list
  timestamp      optional  unix seconds
  supplier_id    optional  the listing's seller

`parse_click` is the single source of the row rules; the Beam pipeline (ingest/mining/) and
the plain reader here both use it, so a row is judged the same way everywhere.
"""
import csv
import math
import os
from typing import Iterable, Iterator, NamedTuple, Sequence

import pyarrow.parquet as pq

from esspr_jax.atomic_io import atomic_open
from esspr_jax.errors import DataError
from esspr_jax.ingest.csv_records import read_records
from esspr_jax.ingest.skips import SkipCounter

COLUMNS = ("session_id", "timestamp", "query", "position", "listing_id", "supplier_id",
           "cate_lv1_name", "cate_name", "relevance", "clicked")
REQUIRED = ("session_id", "query", "listing_id", "cate_lv1_name", "cate_name", "relevance",
            "clicked")
# Every reason a row can be skipped for, in the order they are checked.
REASONS = ("bad_encoding", "wrong_column_count", "empty_id", "empty_query", "bad_number",
           "bad_relevance", "bad_clicked", "unknown_category", "duplicate_row",
           "unknown_listing", "category_mismatch")
_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


class Click(NamedTuple):
  session_id: str
  query: str
  listing_id: str
  cate_lv1_name: str
  cate_name: str
  relevance: float
  clicked: bool
  position: int
  timestamp: int
  supplier_id: str

  @property
  def dedupe_key(self) -> tuple:
    """Two rows with this key equal are one logged event written twice."""
    return (self.session_id, self.position, self.listing_id)


class BadRow(NamedTuple):
  reason: str
  detail: str


def normalize_query(text: str) -> str:
  return " ".join(text.lower().split())


def _text(value) -> str:
  if value is None:
    return ""
  if isinstance(value, bytes):
    value = value.decode("utf-8", errors="replace")
  return str(value).strip()


def _int(value, name: str, minimum: int) -> int:
  text = _text(value)
  number = float(text)  # ValueError on junk; accepts "3" and "3.0"
  if not math.isfinite(number) or number != int(number) or number < minimum:
    raise ValueError(f"{name}={text!r}")
  return int(number)


def column_index(header: Sequence[str], where: str) -> dict:
  """Maps column name -> position; a header without the required columns is fatal."""
  names = [_text(h).lstrip("\ufeff") for h in header]
  missing = [c for c in REQUIRED if c not in names]
  if missing:
    raise DataError(f"{where}: click-log header {names} lacks required columns {missing}")
  return {name: i for i, name in enumerate(names) if name in COLUMNS}


def parse_click(values: Sequence, index: dict, num_columns: int,
                categories: frozenset | None = None) -> Click | BadRow:
  """One raw row -> Click, or BadRow(reason, detail). Never raises on bad content.

  `categories`, when given, is the set of known (cate_lv1_name, cate_name) pairs.
  """
  if len(values) != num_columns:
    return BadRow("wrong_column_count", f"{len(values)} columns, header has {num_columns}")
  get = lambda name, default="": _text(values[index[name]]) if name in index else default  # noqa: E731
  session_id, listing_id = get("session_id"), get("listing_id")
  if not session_id or not listing_id:
    return BadRow("empty_id", f"session_id={session_id!r} listing_id={listing_id!r}")
  query = get("query")
  if not query:
    return BadRow("empty_query", "")
  try:
    position = _int(get("position", "0"), "position", 0)
    timestamp = _int(get("timestamp", "0"), "timestamp", 0)
  except ValueError as e:
    return BadRow("bad_number", str(e))
  rel_text = get("relevance")
  try:
    relevance = float(rel_text)
  except ValueError:
    return BadRow("bad_relevance", repr(rel_text))
  if not (0.0 <= relevance <= 1.0):  # also false for NaN
    return BadRow("bad_relevance", repr(rel_text))
  clicked_text = get("clicked").lower()
  if clicked_text in _TRUE:
    clicked = True
  elif clicked_text in _FALSE:
    clicked = False
  else:
    return BadRow("bad_clicked", repr(clicked_text))
  lv1, leaf = get("cate_lv1_name"), get("cate_name")
  if not leaf or (categories is not None and (lv1, leaf) not in categories):
    return BadRow("unknown_category", f"{lv1!r} / {leaf!r}")
  return Click(session_id, query, listing_id, lv1, leaf, relevance, clicked, position,
               timestamp, get("supplier_id"))


def _open_binary(path: str):
  if "://" in str(path):
    from apache_beam.io.filesystems import FileSystems  # noqa: PLC0415  (Beam: remote logs only)
    return FileSystems.open(str(path))
  return open(path, "rb")


def detect_format(path: str, input_format: str = "auto") -> str:
  if input_format != "auto":
    return input_format
  return "parquet" if str(path).lower().endswith((".parquet", ".pq")) else "csv"


def read_raw_rows(path: str, input_format: str = "auto") -> tuple[list, Iterator]:
  """(header, iterator of (where, values or None)) for a CSV or Parquet click-log file.

  `where` is 'file:line' for CSV (header is line 1; a record's last line) and
  'file:row N' for Parquet, so a person can find the row. `values` is None for a
  record that is not UTF-8. CSV records are read as ingest/csv_records.py says.
  """
  fmt = detect_format(path, input_format)
  if fmt == "parquet":
    return _parquet_rows(path)
  handle = _open_binary(path)
  try:
    header, records = read_records(handle, f"{path}")
  except DataError as e:
    handle.close()
    if "empty file" in str(e):
      raise DataError(f"{path}: empty click-log file (no header)") from None
    raise

  def rows():
    try:
      for line, values in records:
        yield f"{path}:{line}", values
    finally:
      handle.close()
  return header, rows()


def has_rows(path: str, input_format: str = "auto") -> bool:
  """Whether the click log holds at least one row after its header."""
  if detect_format(path, input_format) == "parquet":
    with _open_binary(path) as handle:
      try:
        return pq.ParquetFile(handle).metadata.num_rows > 0
      except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
  _, records = read_raw_rows(path, input_format)
  try:
    return next(records, None) is not None
  finally:
    records.close()


def require_some_rows(paths: Sequence[str], input_format: str = "auto") -> None:
  """A DataError naming the files when no click log has a row after its header: mining
  them would write 0 pairs, and the stage after mining would fail on those."""
  if not any(has_rows(path, input_format) for path in paths):
    raise DataError(f"{', '.join(map(str, paths))}: click log has a header but no rows; "
                    f"nothing to mine")


def read_header(path: str, input_format: str = "auto") -> list:
  """The column names of a click-log file, without reading its rows."""
  if detect_format(path, input_format) == "parquet":
    with _open_binary(path) as handle:
      try:
        return list(pq.ParquetFile(handle).schema_arrow.names)
      except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
  with _open_binary(path) as handle:
    first = handle.readline()
  try:
    text = first.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: click-log header is not UTF-8") from e
  if not text.strip():
    raise DataError(f"{path}: empty click-log file (no header)")
  return next(csv.reader([text]))


def _parquet_rows(path: str):
  handle = _open_binary(path)
  try:
    pfile = pq.ParquetFile(handle)
  except Exception as e:  # pyarrow raises several types for a non-Parquet file
    handle.close()
    raise DataError(f"{path}: not a readable Parquet file: {e}") from e
  header = list(pfile.schema_arrow.names)

  def rows():
    n = 0
    try:
      for batch in pfile.iter_batches(batch_size=8192):
        columns = [col.to_pylist() for col in batch.columns]
        for values in zip(*columns):
          n += 1
          yield f"{path}:row {n}", list(values)
    finally:
      handle.close()
  return header, rows()


def read_clicklog(path: str, categories: frozenset | None = None,
                  skips: SkipCounter | None = None,
                  input_format: str = "auto") -> Iterator[Click]:
  """Valid clicks of one file, in file order; bad and duplicate rows counted in `skips`.

  Call `skips.check_fraction()` after exhausting it to enforce max_bad_fraction.
  """
  skips = skips or SkipCounter(f"click log {path}")
  header, rows = read_raw_rows(path, input_format)
  index = column_index(header, str(path))
  seen = set()
  for where, values in rows:
    if values is None:
      skips.skip("bad_encoding", where)
      continue
    parsed = parse_click(values, index, len(header), categories)
    if isinstance(parsed, BadRow):
      skips.skip(parsed.reason, where, parsed.detail)
      continue
    if parsed.dedupe_key in seen:
      skips.skip("duplicate_row", where, repr(parsed.dedupe_key))
      continue
    seen.add(parsed.dedupe_key)
    skips.ok()
    yield parsed


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str],
                     rows: Iterable[Sequence]) -> int:
  """Writes a CSV via temp file + rename, so readers never see half a file."""
  n = 0
  with atomic_open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
      writer.writerow(row)
      n += 1
  return n
