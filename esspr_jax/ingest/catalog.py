"""The listing catalog: one row per listing, the lookup table mining, export and search
use. `iter_catalog` is its only reader (mining, the export's metadata and the export's
items all read through it), so a row is kept or skipped the same way everywhere.

Columns: listing_id, supplier_id, cate_lv1_name, cate_name, title, image (a path relative
to the catalog file's directory, an absolute path, or a URL). The demo world adds
`style_id`, the hidden truth used only to measure pair precision; mining never reads it.
Accepted aliases: item_id / id for listing_id; image_path / img / image_name for image.
Records are read as ingest/csv_records.py says (quoted multi-line titles, long fields).
"""
import dataclasses
from typing import Iterator

from esspr_jax.ingest.clicklog import _open_binary, write_csv_atomic
from esspr_jax.ingest.csv_records import MAX_TITLE_CHARS, read_records, rows_by_header
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.errors import DataError

COLUMNS = ("listing_id", "style_id", "supplier_id", "cate_lv1_name", "cate_name", "title",
           "image")
REQUIRED = ("listing_id", "cate_lv1_name", "cate_name", "title", "image")
ALIASES = {"item_id": "listing_id", "id": "listing_id", "image_path": "image",
           "img": "image", "image_name": "image"}
# Every reason a row can be skipped for, in the order they are checked.
REASONS = ("bad_encoding", "wrong_column_count", "empty_id", "unknown_category",
           "title_too_long", "duplicate_listing")


@dataclasses.dataclass(frozen=True)
class Listing:
  listing_id: str
  supplier_id: str
  cate_lv1_name: str
  cate_name: str
  title: str
  image: str
  style_id: str = ""
  # Line of the row in its file (1 = header), so later stages can name it; not compared.
  source_row: int = dataclasses.field(default=0, compare=False)


def _canonical_header(header: list[str], path) -> list[str]:
  names = list(header)
  for i, name in enumerate(header):
    canonical = ALIASES.get(name)
    if canonical and canonical not in names:
      names[i] = canonical
  missing = [c for c in REQUIRED if c not in names]
  if missing:
    raise DataError(f"{path}: catalog header {header} lacks required columns {missing}")
  return names


def iter_catalog(path: str, skips: SkipCounter | None = None) -> Iterator[Listing]:
  """Valid listings in file order. Bad rows (not UTF-8, wrong column count, empty id or
  category, a title over MAX_TITLE_CHARS, a duplicate listing id: the first wins) are
  skipped and counted in `skips`."""
  skips = skips or SkipCounter(f"catalog {path}")
  with _open_binary(path) as handle:
    header, records = read_records(handle, f"{path}", skipinitialspace=True)
    header = _canonical_header(header, path)
    seen = set()
    for line, where, row in rows_by_header(records, header, f"{path}", skips):
      if not row["listing_id"]:
        skips.skip("empty_id", where)
        continue
      if not row["cate_name"]:
        skips.skip("unknown_category", where)
        continue
      if len(row["title"]) > MAX_TITLE_CHARS:
        skips.skip("title_too_long", where,
                   f"{len(row['title']):,} characters > {MAX_TITLE_CHARS:,}")
        continue
      if row["listing_id"] in seen:
        skips.skip("duplicate_listing", where, row["listing_id"])
        continue
      seen.add(row["listing_id"])
      skips.ok()
      yield Listing(row["listing_id"], row.get("supplier_id", ""), row["cate_lv1_name"],
                    row["cate_name"], row["title"], row["image"], row.get("style_id", ""),
                    source_row=line)


def read_catalog(path: str, skips: SkipCounter | None = None) -> dict[str, Listing]:
  return {listing.listing_id: listing for listing in iter_catalog(path, skips)}


def write_catalog(path, listings) -> int:
  return write_csv_atomic(path, COLUMNS, ([getattr(x, c) for c in COLUMNS] for x in listings))
