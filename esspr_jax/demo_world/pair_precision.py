"""Pair precision against hidden truth: the share of mined pairs that are the same style.

Only the demo world has the truth (catalog.csv's `style_id`); it measures how much the
mining constraints clean the click noise. Mining itself never reads `style_id`.
"""
import collections
import dataclasses

from esspr_jax.ingest.catalog import read_catalog
from esspr_jax.ingest.pair_files import read_pairs  # a file, glob or mining shards
from esspr_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Precision:
  pairs: int
  same_style: int
  by_category: dict   # cate_name -> (pairs, same_style)

  @property
  def precision(self) -> float:
    return self.same_style / self.pairs if self.pairs else float("nan")

  def table(self) -> str:
    lines = [f"{'category':<28}{'pairs':>8}{'precision':>11}"]
    for cate, (n, ok) in sorted(self.by_category.items()):
      lines.append(f"{cate:<28}{n:>8}{ok / n:>11.3f}")
    lines.append(f"{'all':<28}{self.pairs:>8}{self.precision:>11.3f}")
    return "\n".join(lines)


def precision_of(pairs: list[tuple[str, str, str]], style_of: dict) -> Precision:
  """pairs: (category, listing a, listing b); style_of: listing -> style id."""
  by_cat = collections.defaultdict(lambda: [0, 0])
  for cate, a, b in pairs:
    if a not in style_of or b not in style_of:
      raise DataError(f"pair ({a}, {b}) names a listing without a style_id")
    by_cat[cate][0] += 1
    by_cat[cate][1] += style_of[a] == style_of[b]
  return Precision(sum(v[0] for v in by_cat.values()), sum(v[1] for v in by_cat.values()),
                   {k: tuple(v) for k, v in by_cat.items()})


def pair_precision(pairs_csv, catalog_csv) -> Precision:
  style_of = {k: v.style_id for k, v in read_catalog(str(catalog_csv)).items()}
  if not any(style_of.values()):
    raise DataError(f"{catalog_csv}: no style_id column, so no truth to measure against")
  return precision_of([(r.cate_name, r.trigger_id, r.recall_id) for r in read_pairs(pairs_csv)],
                      style_of)
