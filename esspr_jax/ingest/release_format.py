"""The eSSPR release row format, shared by mining (writes) and the TFDS builder (reads).

Canonical header:
  cate_lv1_name,cate_name,trigger_id,trigger_title,recall_id,recall_title,trigger_img,recall_img,label
The public 10-pair sample uses a close variant:
  trigger_id, trigger_title, trigger_image_name, recall_id, recall_title, recall_image_name
(spaces after commas, `*_image_name` for `*_img`, no categories, no label: every row
is an annotated positive). Both read into the canonical dict.
"""
import csv
import dataclasses
import math
import os
import pathlib
from typing import Iterable, Iterator

from esspr_jax.atomic_io import atomic_open
from esspr_jax.ingest.csv_records import MAX_TITLE_CHARS, read_records, rows_by_header
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.errors import DataError

FIELDS = ("cate_lv1_name", "cate_name", "trigger_id", "trigger_title", "recall_id",
          "recall_title", "trigger_img", "recall_img", "label")
_ALIASES = {"trigger_image_name": "trigger_img", "recall_image_name": "recall_img"}
_REQUIRED = ("trigger_id", "trigger_title", "recall_id", "recall_title", "trigger_img",
             "recall_img")


@dataclasses.dataclass(frozen=True)
class PairRow:
  cate_lv1_name: str
  cate_name: str
  trigger_id: str
  trigger_title: str
  recall_id: str
  recall_title: str
  trigger_img: str
  recall_img: str
  label: int
  # Line of the row in its file (1 = header), so later stages can name it; not compared.
  source_row: int = dataclasses.field(default=0, compare=False)


def canonical_header(header: list[str]) -> list[str]:
  """Maps a header (canonical or the sample's variant) to canonical field names."""
  names = [_ALIASES.get(h.strip(), h.strip()) for h in header]
  missing = [f for f in _REQUIRED if f not in names]
  if missing:
    raise DataError(f"pair file header {header} lacks required columns {missing}")
  return names


def read_pairs(path: str | os.PathLike, skips: SkipCounter | None = None) -> Iterator[PairRow]:
  """Yields valid rows; bad rows are skipped and counted in `skips` by reason.

  Reasons: bad_encoding (the record is not UTF-8), wrong_column_count, empty_id,
  self_pair, bad_label, title_too_long (over csv_records.MAX_TITLE_CHARS). Records are
  read as ingest/csv_records.py says (quoted multi-line titles, long fields). Titles may
  be empty here (the tokenizer flags them); images are checked later, when decoded.
  """
  skips = skips or SkipCounter(f"pairs {path}")
  path = pathlib.Path(path)
  with open(path, "rb") as handle:
    try:
      raw_header, records = read_records(handle, f"{path}", skipinitialspace=True)
    except DataError as e:
      if "empty file" in str(e):
        raise DataError(f"{path}: empty pair file (no header)") from None
      raise
    header = canonical_header(raw_header)
    for rowno, where, row in rows_by_header(records, header, f"{path}", skips,
                                            skip_blank=True):
      if not row["trigger_id"] or not row["recall_id"]:
        skips.skip("empty_id", where)
        continue
      if row["trigger_id"] == row["recall_id"]:
        skips.skip("self_pair", where)
        continue
      label_text = row.get("label", "1") or "1"
      try:
        label = float(label_text)
        if math.isnan(label) or label not in (0.0, 1.0):
          raise ValueError
      except ValueError:
        skips.skip("bad_label", where, repr(label_text))
        continue
      longest = max(len(row["trigger_title"]), len(row["recall_title"]))
      if longest > MAX_TITLE_CHARS:
        skips.skip("title_too_long", where, f"{longest:,} characters > {MAX_TITLE_CHARS:,}")
        continue
      skips.ok()
      yield PairRow(
          cate_lv1_name=row.get("cate_lv1_name", ""), cate_name=row.get("cate_name", ""),
          trigger_id=row["trigger_id"], trigger_title=row["trigger_title"],
          recall_id=row["recall_id"], recall_title=row["recall_title"],
          trigger_img=row["trigger_img"], recall_img=row["recall_img"], label=int(label),
          source_row=rowno)


def write_pairs(path: str | os.PathLike, rows: Iterable[PairRow]) -> int:
  """Writes rows in the canonical format atomically (temp file + rename). Returns the count."""
  n = 0
  with atomic_open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(FIELDS)
    for row in rows:
      writer.writerow([getattr(row, k) for k in FIELDS])
      n += 1
  return n
