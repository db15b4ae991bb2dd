"""Records of a user's CSV file, read one way by every reader (catalogs, pair files,
click logs), so a row is split and judged the same in mining, building and export.

- Records, not lines: the file is decoded as a stream with `newline=""`, so a quoted
  title may hold line breaks, and only \\n / \\r end a line (never U+2028, U+0085 or the
  other separators `str.splitlines` splits at).
- Bytes that are not UTF-8 make their whole record bad (`None` values, counted as
  bad_encoding by the caller): a multi-line record with one bad line is skipped once,
  never kept with a mangled field and counted too.
- Fields may be up to MAX_FIELD_CHARS long (Python's csv default of 131,072 would stop
  the whole file at the first longer one); titles over MAX_TITLE_CHARS are counted as
  title_too_long by the readers. A field over MAX_FIELD_CHARS is not a row of these
  files: a DataError naming the line.
"""
import csv
import io
import re
from typing import BinaryIO, Iterator

from esspr_jax.errors import DataError

# The longest title a listing or pair may have (characters). Real titles are a few
# hundred characters; the text tower reads max_len tokens of it anyway.
MAX_TITLE_CHARS = 65_536
# The longest field the CSV reader accepts (characters; csv.field_size_limit).
MAX_FIELD_CHARS = 16 * 1024 * 1024

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for bad bytes


def allow_long_fields() -> None:
  """Raises the csv module's (process-wide) field limit to MAX_FIELD_CHARS."""
  if csv.field_size_limit() < MAX_FIELD_CHARS:
    csv.field_size_limit(MAX_FIELD_CHARS)


def read_records(handle: BinaryIO, where: str, *, skipinitialspace: bool = False
                 ) -> tuple[list[str], Iterator[tuple[int, list[str] | None]]]:
  """(header, iterator of (line number, values, or None for a record that is not UTF-8)).

  The line number is the record's last physical line (the header is line 1). Blank
  records are left out. An empty file is a DataError; so is a header that is not UTF-8.
  """
  allow_long_fields()
  if not isinstance(handle, io.IOBase):  # e.g. a Beam FileSystems handle for gs://
    handle = io.BytesIO(handle.read())
  text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
  reader = csv.reader(text, skipinitialspace=skipinitialspace)
  try:
    header = next(reader)
  except StopIteration:
    raise DataError(f"{where}: empty file (no header)") from None
  except csv.Error as e:
    raise DataError(f"{where}:1: unreadable CSV header ({e})") from None
  if any(_UNDECODABLE.search(h) for h in header):
    raise DataError(f"{where}: header is not UTF-8")

  def records():
    while True:
      try:
        values = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        raise DataError(f"{where}:{reader.line_num}: unreadable CSV record ({e}); a field "
                        f"may be at most {MAX_FIELD_CHARS:,} characters") from None
      if not values or (len(values) == 1 and not values[0].strip()):
        continue
      if any(_UNDECODABLE.search(v) for v in values):
        yield reader.line_num, None
        continue
      yield reader.line_num, values
  return [h.strip() for h in header], records()


def rows_by_header(records: Iterator[tuple[int, list[str] | None]], header: list[str],
                   path: str, skips, *, skip_blank: bool = False
                   ) -> Iterator[tuple[int, str, dict[str, str]]]:
  """(line number, 'path:line', {column: stripped value}) for each record of `records`
  that is UTF-8 and has the header's column count; the others are counted in `skips`
  (bad_encoding, wrong_column_count). With `skip_blank`, records whose every field is
  blank are dropped without a count (a spreadsheet's trailing ',,,' rows)."""
  for line, values in records:
    where = f"{path}:{line}"
    if values is None:
      skips.skip("bad_encoding", where, "record is not UTF-8")
      continue
    if skip_blank and all(not v.strip() for v in values):
      continue
    if len(values) != len(header):
      skips.skip("wrong_column_count", where,
                 f"{len(values)} columns, header has {len(header)}")
      continue
    yield line, where, dict(zip(header, (v.strip() for v in values)))
