"""The training catalog: the distinct listings of the training pairs, their leaf
categories, and which listings are each other's positives.

A listing's positives are its same-style group: the connected component of the
training pairs through it (every pair is a same-style/co-click positive, and
same-style is transitive), so a mined negative is never a listing the pairs say is
the same product.
"""
from collections.abc import Sequence

import numpy as np

SIDES = ("trigger", "recall")


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TrainingCatalog(Sequence):
  """Listings (stored sides {'id','title','image'}) in first-occurrence order.

  trigger_row[i] / recall_row[i]: the listing rows of pair i's sides; category[r]:
  an integer code of listing r's leaf category (its first pair's `cate_name`)."""

  def __init__(self, source: Sequence):
    self._source = source
    self._where: list[tuple[int, str]] = []
    row_of: dict[str, int] = {}
    names: dict[str, int] = {}
    categories: list[int] = []
    rows = np.zeros((len(source), 2), np.int64)
    for i in range(len(source)):
      example = source[i]
      code = names.setdefault(_text(example.get("cate_name", "")), len(names))
      for k, side in enumerate(SIDES):
        listing = _text(example[side]["id"])
        if listing not in row_of:
          row_of[listing] = len(self._where)
          self._where.append((i, side))
          categories.append(code)
        rows[i, k] = row_of[listing]
    self.ids = list(row_of)
    self.category = np.asarray(categories, np.int64)
    self.trigger_row, self.recall_row = rows[:, 0], rows[:, 1]
    self.group = _components(len(self._where), rows)
    order = np.argsort(self.group, kind="stable")
    starts = np.searchsorted(self.group[order], np.arange(self.group.max(initial=-1) + 2))
    self._members = [order[starts[g]:starts[g + 1]] for g in range(len(starts) - 1)]

  def __len__(self) -> int:
    return len(self._where)

  def __getitem__(self, row: int) -> dict:
    i, side = self._where[row]
    return self._source[i][side]

  def positives(self, row: int) -> np.ndarray:
    """The listing rows in `row`'s same-style group, itself included."""
    return self._members[self.group[row]]


def _components(count: int, edges: np.ndarray) -> np.ndarray:
  """Connected-component label (0..k-1, by first member) of each of `count` nodes."""
  parent = np.arange(count)

  def root(x):
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for a, b in edges:
    ra, rb = root(a), root(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  roots = np.array([root(x) for x in range(count)], np.int64)
  _, labels = np.unique(roots, return_inverse=True)
  return labels.astype(np.int64)
