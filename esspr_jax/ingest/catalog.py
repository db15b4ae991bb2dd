"""The listing catalog: one row per listing, the lookup table mining and search use.

Columns: listing_id, supplier_id, cate_lv1_name, cate_name, title, image (a path relative
to the catalog file's directory, an absolute path, or a URL). The demo world adds
`style_id`, the hidden truth used only to measure pair precision; mining never reads it.
"""
import csv
import dataclasses
from typing import Iterator

from esspr_jax.ingest.clicklog import _open_binary, write_csv_atomic
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.errors import DataError

COLUMNS = ("listing_id", "style_id", "supplier_id", "cate_lv1_name", "cate_name", "title",
           "image")
REQUIRED = ("listing_id", "cate_lv1_name", "cate_name", "title", "image")


@dataclasses.dataclass(frozen=True)
class Listing:
  listing_id: str
  supplier_id: str
  cate_lv1_name: str
  cate_name: str
  title: str
  image: str
  style_id: str = ""


def iter_catalog(path: str, skips: SkipCounter | None = None) -> Iterator[Listing]:
  """Valid listings in file order. Bad rows (wrong column count, empty id or category,
  duplicate listing id, non-UTF-8) are skipped and counted in `skips`."""
  skips = skips or SkipCounter(f"catalog {path}")
  with _open_binary(path) as handle:
    try:
      text = handle.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: catalog is not UTF-8 ({e})") from e
  reader = csv.reader(text.splitlines())
  try:
    header = [h.strip() for h in next(reader)]
  except StopIteration:
    raise DataError(f"{path}: empty catalog file (no header)")
  missing = [c for c in REQUIRED if c not in header]
  if missing:
    raise DataError(f"{path}: catalog header {header} lacks required columns {missing}")
  seen = set()
  for values in reader:
    where = f"{path}:{reader.line_num}"
    if not values:
      continue
    if len(values) != len(header):
      skips.skip("wrong_column_count", where, f"{len(values)} columns, header has {len(header)}")
      continue
    row = dict(zip(header, (v.strip() for v in values)))
    if not row["listing_id"]:
      skips.skip("empty_id", where)
      continue
    if not row["cate_name"]:
      skips.skip("unknown_category", where)
      continue
    if row["listing_id"] in seen:
      skips.skip("duplicate_listing", where, row["listing_id"])
      continue
    seen.add(row["listing_id"])
    skips.ok()
    yield Listing(row["listing_id"], row.get("supplier_id", ""), row["cate_lv1_name"],
                  row["cate_name"], row["title"], row["image"], row.get("style_id", ""))


def read_catalog(path: str, skips: SkipCounter | None = None) -> dict[str, Listing]:
  return {listing.listing_id: listing for listing in iter_catalog(path, skips)}


def write_catalog(path, listings) -> int:
  return write_csv_atomic(path, COLUMNS, ([getattr(x, c) for c in COLUMNS] for x in listings))
