"""Splittable Beam sources for click-log files: CSV by byte range, Parquet by row group.

A runner splits each file into ranges and reads them on different workers (Dataflow also
rebalances them while running), so one big log is no longer read by one DoFn. Records
are `(path, position, payload)`:
  CSV      position = byte offset of the line, payload = the raw line (bytes)
  Parquet  position = 1-based row number,      payload = the row's values (list)
Parsing stays in one place (clicklog.parse_click, via mining_graph.ParseClicks).

CSV rows are split at newlines, so a click-log row must be one line: a quoted field
holding a newline makes its pieces bad rows (counted, never merged). Compressed files
(.gz, ...) are read whole, since a compressed stream cannot be entered mid-way.
"""
import pyarrow.parquet as pq
from apache_beam.io.filebasedsource import FileBasedSource
from apache_beam.io.filesystem import CompressionTypes


def csv_where(path: str, offset: int) -> str:
  """Names a CSV row: `tail -c +$((offset + 1)) FILE | head -1` prints it."""
  return f"{path}:byte {offset}"


def parquet_where(path: str, row: int) -> str:
  return f"{path}:row {row}"


class CsvLines(FileBasedSource):
  """Lines of the files matching `pattern`, without each file's header line.

  A line belongs to the range that holds its first byte, so ranges never share or lose
  a line."""

  def __init__(self, pattern: str, min_bundle_size: int = 0):
    super().__init__(pattern, min_bundle_size=min_bundle_size,
                     compression_type=CompressionTypes.AUTO, splittable=True, validate=False)

  def read_records(self, file_name, offset_range_tracker):
    start = offset_range_tracker.start_position()
    with self.open_file(file_name) as f:
      if start > 0:
        # The line holding byte start-1 began in the previous range: skip past it.
        f.seek(start - 1)
        position = start - 1 + len(f.readline())
      else:
        position = 0
      while offset_range_tracker.try_claim(position):
        line = f.readline()
        if not line:
          return
        if position > 0:  # offset 0 is the header
          yield file_name, position, line
        position += len(line)


def _row_group_offset(group) -> int:
  column = group.column(0)
  if column.has_dictionary_page and column.dictionary_page_offset:
    return column.dictionary_page_offset
  return column.data_page_offset


class ParquetRows(FileBasedSource):
  """Rows of the Parquet files matching `pattern`, read one row group at a time.

  A row group belongs to the range that holds its first byte; row numbers count from the
  file's first row, so a bad row is named the same way however the file was split."""

  def __init__(self, pattern: str, min_bundle_size: int = 0):
    super().__init__(pattern, min_bundle_size=min_bundle_size,
                     compression_type=CompressionTypes.UNCOMPRESSED, splittable=True,
                     validate=False)

  def read_records(self, file_name, offset_range_tracker):
    start = offset_range_tracker.start_position()
    with self.open_file(file_name) as f:
      pfile = pq.ParquetFile(f)
      first_row = 0
      for g in range(pfile.metadata.num_row_groups):
        group = pfile.metadata.row_group(g)
        offset = _row_group_offset(group)
        if offset >= start:
          if not offset_range_tracker.try_claim(offset):
            return
          columns = [c.to_pylist() for c in pfile.read_row_group(g).columns]
          for i, values in enumerate(zip(*columns)):
            yield file_name, first_row + i + 1, list(values)
        first_row += group.num_rows
