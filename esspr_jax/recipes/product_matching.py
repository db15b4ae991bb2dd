"""Public product-matching benchmarks as eSSPR release-format pairs and t-t retrieval sets.

Each benchmark lists offers of the same product from two shops. We turn its positive
pairs into release-format `PairRow`s (trigger = left shop, recall = right shop) for
training, and hold out a part as a retrieval task: each held-out pair's trigger title
is a query, the gallery is every right-shop offer of that part, and the pair's recall
must rank first (the paper's protocol: one query per annotated pair, the query's other
annotated positives do not compete).

Sources (read `SOURCE.md` in each folder of ../shared/data):
- `amazon_google`: two full catalogs (latin-1, old-Mac CR line endings) + gold pairs.
  Held out: a seeded slice of the gold pairs, cut along connected components of the
  gold graph so no held-out product occurs in a training pair; gallery = the whole
  Google catalog (3,226 offers).
- `walmart_amazon`: gzipped JSON-lines pairs with labels; train split -> training,
  test split -> held out (gallery = the split's distinct Amazon offers). Training
  pairs touching an offer of a held-out positive pair are dropped (no leakage).
- validation (`validation_fraction` > 0): a seeded slice of each held-out set's
  TRAINING pairs, cut along connected components of their pair graph and removed from
  training, becomes a validation task with its own gallery (amazon_google: the Google
  catalog minus every held-out positive; walmart_amazon: the train-split candidates of
  the validation triggers). Fusion weights and methods are chosen on it, never on the
  held-out tasks; it shares no offer with them or with the remaining training pairs.
- `promap_en_cz`: English and Czech test sets (UTF-8, some mojibake, repaired here);
  training only.
- `promap_laptops_10pairs`: 10 laptops x 2 Czech shops with photos, for the
  image+text eval: listing `NNa` <-> `NNb`, first image of each listing.

`wdc_products_*` and `abt_buy` are reserved for independent evaluation and are
deliberately not readable from here.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np

from esspr_jax.atomic_io import atomic_open
from esspr_jax.ingest import release_format
from esspr_jax.ingest.release_format import PairRow
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.errors import DataError

RESERVED = ("wdc_products_80cc20rnd000un", "abt_buy")
TRAIN_SETS = ("amazon_google", "walmart_amazon", "promap_en_cz")
HELDOUT_SETS = ("amazon_google", "walmart_amazon")


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
  """A t-t retrieval task: one query per held-out positive pair, ranked over `gallery`.

  `pairs[k]` is query k (trigger id/title) with its positive (recall id/title); every
  recall id is in `gallery` (id -> title).
  """
  name: str
  pairs: tuple[PairRow, ...]
  gallery: dict[str, str]

  def query_titles(self) -> list[str]:
    return [p.trigger_title for p in self.pairs]

  def gallery_ids(self) -> list[str]:
    return list(self.gallery)

  def targets_and_ignore(self) -> tuple[np.ndarray, np.ndarray]:
    """Gallery index of each query's positive, and of its other positives (padded -1).

    In the format `esspr_jax.retrieval.metrics.pessimistic_ranks` takes.
    """
    index = {gid: k for k, gid in enumerate(self.gallery)}
    positives: dict[str, list[int]] = {}
    for p in self.pairs:
      positives.setdefault(p.trigger_id, []).append(index[p.recall_id])
    target = np.array([index[p.recall_id] for p in self.pairs], np.int64)
    width = max(1, max(len(v) for v in positives.values()) - 1) if self.pairs else 1
    ignore = np.full((len(self.pairs), width), -1, np.int64)
    for k, p in enumerate(self.pairs):
      others = [g for g in positives[p.trigger_id] if g != target[k]]
      ignore[k, :len(others)] = others
    return target, ignore


@dataclasses.dataclass(frozen=True)
class MatchingData:
  """One benchmark's training pairs and (optional) held-out retrieval task."""
  name: str
  train: tuple[PairRow, ...]
  heldout: RetrievalSet | None
  skips: dict
  dropped_overlapping_heldout: int = 0
  validation: RetrievalSet | None = None


# ---------------------------------------------------------------- text helpers

_MOJIBAKE_MARKERS = re.compile("[\u00c2\u00c3\u00e2\u00ef][\u0080-\u00bf\u0152\u0153\u0160\u0161"
                               "\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]")
_CP1252_EXTRA = {ch: bytes([b]) for b in range(0x80, 0xA0)
                 for ch in [bytes([b]).decode("cp1252", errors="ignore")] if ch}


def _as_cp1252_bytes(text: str) -> bytes | None:
  """Inverse of decoding bytes as Windows-1252 (undefined bytes as latin-1); None if impossible."""
  out = bytearray()
  for ch in text:
    code = ord(ch)
    if code < 256:
      out.append(code)
    elif ch in _CP1252_EXTRA:
      out += _CP1252_EXTRA[ch]
    else:
      return None
  return bytes(out)


def repair_mojibake(text: str, max_rounds: int = 3) -> str:
  """Undoes UTF-8 text that was decoded as Windows-1252 (possibly more than once).

  'Ã¢â‚¬â€œ' -> '–'. A round is only taken when the bytes decode as UTF-8 and the
  result has fewer mojibake markers, so clean text (incl. Czech) is left alone.
  """
  for _ in range(max_rounds):
    markers = len(_MOJIBAKE_MARKERS.findall(text))
    if not markers:
      break
    raw = _as_cp1252_bytes(text)
    if raw is None:
      break
    try:
      fixed = raw.decode("utf-8")
    except UnicodeDecodeError:
      break
    if len(_MOJIBAKE_MARKERS.findall(fixed)) >= markers:
      break
    text = fixed
  return text


def clean_title(text: str) -> str:
  """Mojibake repaired, whitespace collapsed."""
  return " ".join(repair_mojibake(text or "").split())


def _pair(dataset: str, category: str, left_id: str, left_title: str, right_id: str,
          right_title: str, left_img: str = "", right_img: str = "") -> PairRow:
  return PairRow(cate_lv1_name=dataset, cate_name=category, trigger_id=left_id,
                 trigger_title=left_title, recall_id=right_id, recall_title=right_title,
                 trigger_img=left_img, recall_img=right_img, label=1)


def _dedupe(pairs: Iterable[PairRow], skips: SkipCounter, where: str) -> list[PairRow]:
  seen, out = set(), []
  for p in pairs:
    key = (p.trigger_id, p.recall_id)
    if key in seen:
      skips.skip("duplicate_pair", where, f"{key}")
      continue
    seen.add(key)
    out.append(p)
  return out


def _require(path: pathlib.Path) -> pathlib.Path:
  if path.parent.name in RESERVED:
    raise DataError(f"{path.parent} is reserved for independent evaluation; "
                    "it is not to be read for training or tuning")
  if not path.is_file():
    raise DataError(f"missing data file {path} (see SOURCE.md in its folder)")
  return path


# ---------------------------------------------------------------- amazon_google

def _read_catalog(path: pathlib.Path, skips: SkipCounter) -> dict[str, str]:
  """id -> cleaned title from a Leipzig table (latin-1; CR, LF or CRLF line endings)."""
  text = _require(path).read_bytes().decode("latin-1")
  reader = csv.reader(io.StringIO(text, newline=""))
  header = [h.strip() for h in next(reader, [])]
  if "id" not in header or "title" not in header:
    raise DataError(f"{path}: header {header} lacks 'id' and 'title'")
  id_col, title_col = header.index("id"), header.index("title")
  titles = {}
  for rowno, row in enumerate(reader, start=2):
    if not row:
      continue
    where = f"{path}:{rowno}"
    if len(row) != len(header):
      skips.skip("wrong_column_count", where, f"{len(row)} columns, header has {len(header)}")
      continue
    title = clean_title(row[title_col])
    if not title:
      skips.skip("empty_title", where)
      continue
    item_id = row[id_col].strip()
    if item_id in titles:
      skips.skip("duplicate_id", where, item_id)
      continue
    skips.ok()
    titles[item_id] = title
  return titles


def _components(pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
  """Connected components of the bipartite pair graph, as lists of pair indices."""
  parent: dict[str, str] = {}

  def find(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for a, b in pairs:
    parent[find("A" + a)] = find("B" + b)
  groups: dict[str, list[int]] = {}
  for k, (a, _) in enumerate(pairs):
    groups.setdefault(find("A" + a), []).append(k)
  return sorted(groups.values())


def _take_components(pairs: Sequence[PairRow], fraction: float, rng: np.random.Generator
                     ) -> set[int]:
  """Indices of whole connected components, in a seeded order, until ~fraction of pairs."""
  comps = _components([(p.trigger_id, p.recall_id) for p in pairs])
  target = fraction * len(pairs)
  taken: set[int] = set()
  for c in rng.permutation(len(comps)):
    if len(taken) >= target:
      break
    taken.update(comps[c])
  return taken


def carve_validation(name: str, pairs: Sequence[PairRow], fraction: float, seed: int,
                     gallery: dict[str, str], exclude: set[str] = frozenset()
                     ) -> tuple[tuple[PairRow, ...], RetrievalSet | None]:
  """(remaining training pairs, validation task) from a seeded slice of `pairs`' components.

  The validation gallery is `gallery` minus the ids in `exclude` (offers of the held-out
  task), plus every validation positive. No validation offer is in a remaining pair.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
  if fraction == 0.0 or not pairs:
    return tuple(pairs), None
  taken = _take_components(pairs, fraction, np.random.default_rng([seed, 1]))
  val = tuple(p for k, p in enumerate(pairs) if k in taken)
  train = tuple(p for k, p in enumerate(pairs) if k not in taken)
  val_gallery = {g: t for g, t in gallery.items() if g not in exclude}
  for p in val:
    val_gallery.setdefault(p.recall_id, p.recall_title)
  return train, RetrievalSet(name, val, val_gallery)


def load_amazon_google(root: str | os.PathLike, holdout_fraction: float = 0.3,
                       seed: int = 0, strict: bool = False,
                       validation_fraction: float = 0.0) -> MatchingData:
  """Gold pairs split by connected component: ~`holdout_fraction` of them held out, then
  ~`validation_fraction` of the rest carved out as a validation task."""
  if not 0.0 <= holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
  root = pathlib.Path(root) / "amazon_google"
  skips = SkipCounter(f"amazon_google {root}", strict=strict)
  amazon = _read_catalog(root / "tableA.csv", skips)
  google = _read_catalog(root / "tableB.csv", skips)
  gold_path = _require(root / "gold.csv")
  pairs = []
  with open(gold_path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    if header[:2] != ["tableA_id", "tableB_id"]:
      raise DataError(f"{gold_path}: expected header tableA_id,tableB_id, got {header}")
    for rowno, row in enumerate(reader, start=2):
      where = f"{gold_path}:{rowno}"
      if len(row) < 2 or row[0].strip() not in amazon or row[1].strip() not in google:
        skips.skip("unknown_id", where, f"{row}")
        continue
      skips.ok()
      a, b = row[0].strip(), row[1].strip()
      pairs.append(_pair("amazon_google", "", f"amazon_google/A{a}", amazon[a],
                         f"amazon_google/B{b}", google[b]))
  pairs = _dedupe(pairs, skips, str(gold_path))
  skips.check_fraction()
  held = _take_components(pairs, holdout_fraction, np.random.default_rng(seed))
  train = tuple(p for k, p in enumerate(pairs) if k not in held)
  heldout_pairs = tuple(p for k, p in enumerate(pairs) if k in held)
  gallery = {f"amazon_google/B{b}": t for b, t in google.items()}
  heldout = RetrievalSet("amazon_google", heldout_pairs, gallery) if heldout_pairs else None
  train, validation = carve_validation(
      "amazon_google", train, validation_fraction, seed, gallery,
      {p.recall_id for p in heldout_pairs} | {p.trigger_id for p in heldout_pairs})
  return MatchingData("amazon_google", train, heldout, skips.summary(), validation=validation)


# ---------------------------------------------------------------- walmart_amazon

def read_json_lines(path: pathlib.Path, skips: SkipCounter) -> list[dict]:
  """Every labelled row of a gzipped JSON-lines pair file (label 0 and 1); a bad line
  is counted in `skips` (the duplicates benchmark reads the negatives too)."""
  rows = []
  with gzip.open(_require(path), "rt", encoding="utf-8") as f:
    for rowno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        row["label"] = int(row["label"])
        for key in ("id_left", "id_right", "title_left", "title_right"):
          if not isinstance(row[key], str):
            raise TypeError(f"{key} is not a string")
      except (ValueError, KeyError, TypeError) as e:
        skips.skip("bad_json_row", f"{path}:{rowno}", str(e))
        continue
      row["_where"] = f"{path}:{rowno}"
      rows.append(row)
  return rows


def _walmart_pairs(rows: list[dict], skips: SkipCounter) -> list[PairRow]:
  out = []
  for row in rows:
    if row["label"] != 1:
      continue
    left, right = clean_title(row["title_left"]), clean_title(row["title_right"])
    if not left or not right:
      skips.skip("empty_title", row["_where"])
      continue
    skips.ok()
    out.append(_pair("walmart_amazon", clean_title(str(row.get("category_left") or "")),
                     "walmart_amazon/" + row["id_left"], left,
                     "walmart_amazon/" + row["id_right"], right))
  return out


def load_walmart_amazon(root: str | os.PathLike, strict: bool = False,
                        validation_fraction: float = 0.0, seed: int = 0) -> MatchingData:
  """Train-split positives (minus leaking ones) for training, ~`validation_fraction` of
  them carved out for validation; test split held out."""
  root = pathlib.Path(root) / "walmart_amazon"
  skips = SkipCounter(f"walmart_amazon {root}", strict=strict)
  train_rows = read_json_lines(root / "walmart-amazon-train.json.gz", skips)
  test_rows = read_json_lines(root / "walmart-amazon-gs.json.gz", skips)
  test_pairs = _dedupe(_walmart_pairs(test_rows, skips), skips, "walmart-amazon-gs")
  held_offers = {p.trigger_id for p in test_pairs} | {p.recall_id for p in test_pairs}
  candidates = _dedupe(_walmart_pairs(train_rows, skips), skips, "walmart-amazon-train")
  train = [p for p in candidates
           if p.trigger_id not in held_offers and p.recall_id not in held_offers]
  skips.check_fraction()
  gallery = {}
  for row in test_rows:
    title = clean_title(row["title_right"])
    if title:
      gallery.setdefault("walmart_amazon/" + row["id_right"], title)
  heldout = RetrievalSet("walmart_amazon", tuple(test_pairs), gallery) if test_pairs else None
  dropped = len(candidates) - len(train)
  # The validation gallery mirrors the test one: the right-side candidates (any label)
  # listed with the validation triggers in the train split.
  train, validation = carve_validation("walmart_amazon", train, validation_fraction, seed,
                                       {}, held_offers)
  if validation is not None:
    triggers = {p.trigger_id for p in validation.pairs}
    more = {}
    for row in train_rows:
      rid, title = "walmart_amazon/" + row["id_right"], clean_title(row["title_right"])
      if "walmart_amazon/" + row["id_left"] in triggers and title and rid not in held_offers:
        more.setdefault(rid, title)
    validation = RetrievalSet("walmart_amazon", validation.pairs, {**more, **validation.gallery})
  return MatchingData("walmart_amazon", tuple(train), heldout, skips.summary(),
                      dropped_overlapping_heldout=dropped, validation=validation)


# ---------------------------------------------------------------- promap_en_cz

def load_promap_en_cz(root: str | os.PathLike, strict: bool = False) -> MatchingData:
  """Matching pairs of ProMapEn (Walmart/Amazon) and ProMapCz (Alza/Mall); training only."""
  root = pathlib.Path(root) / "promap_en_cz"
  skips = SkipCounter(f"promap_en_cz {root}", strict=strict)
  pairs = []
  for lang in ("en", "cz"):
    path = _require(root / f"promap{lang}-test_data.csv")
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f)
      need = {"name1", "name2", "id1", "id2", "match"}
      if not need <= set(reader.fieldnames or ()):
        raise DataError(f"{path}: header lacks {sorted(need - set(reader.fieldnames or ()))}")
      for rowno, row in enumerate(reader, start=2):
        where = f"{path}:{rowno}"
        if (row.get("match") or "").strip() not in ("0", "1"):
          skips.skip("bad_label", where, repr(row.get("match")))
          continue
        if row["match"].strip() != "1":
          continue
        left, right = clean_title(row["name1"]), clean_title(row["name2"])
        if not left or not right or not row["id1"] or not row["id2"]:
          skips.skip("empty_title_or_id", where)
          continue
        if row["id1"] == row["id2"]:
          skips.skip("self_pair", where)
          continue
        skips.ok()
        pairs.append(_pair(f"promap_{lang}", (row.get("category") or "").strip(),
                           f"promap_{lang}/{row['id1'].strip()}", left,
                           f"promap_{lang}/{row['id2'].strip()}", right))
  pairs = _dedupe(pairs, skips, str(root))
  skips.check_fraction()
  return MatchingData("promap_en_cz", tuple(pairs), None, skips.summary())


# ---------------------------------------------------------------- promap_laptops_10pairs

def load_promap_laptops(root: str | os.PathLike) -> list[PairRow]:
  """The 10 laptop pairs with photos: `NNa` <-> `NNb`, each with its first image.

  Image paths are relative to the dataset folder (`<root>/promap_laptops_10pairs`), the
  image root to use when building or evaluating.
  """
  folder = pathlib.Path(root) / "promap_laptops_10pairs"
  path = _require(folder / "manifest.csv")
  listings: dict[tuple[str, str], dict] = {}
  with open(path, encoding="utf-8", newline="") as f:
    for rowno, row in enumerate(csv.DictReader(f), start=2):
      images = [s for s in (row.get("image_files") or "").split(";") if s]
      if not images:
        raise DataError(f"{path}:{rowno}: listing {row.get('listing_id')} has no image_files")
      if not (folder / images[0]).is_file():
        raise DataError(f"{path}:{rowno}: image {images[0]} not found under {folder}")
      listings[(row["group_id"], row["shop"])] = dict(row, image=images[0])
  groups = sorted({g for g, _ in listings})
  pairs = []
  for g in groups:
    if (g, "a") not in listings or (g, "b") not in listings:
      raise DataError(f"{path}: product group {g} lacks a listing from shop a or b")
    a, b = listings[(g, "a")], listings[(g, "b")]
    pairs.append(_pair("promap_laptops", "laptops", a["listing_id"], clean_title(a["title"]),
                       b["listing_id"], clean_title(b["title"]), a["image"], b["image"]))
  return pairs


# ---------------------------------------------------------------- writing / reading

def _write_atomic_csv(path: pathlib.Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
  with atomic_open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def write_retrieval_set(out_dir: str | os.PathLike, rs: RetrievalSet) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `<name>_pairs.csv` (release format) and `<name>_gallery.csv` (id,title)."""
  out_dir = pathlib.Path(out_dir)
  pairs_path = out_dir / f"{rs.name}_pairs.csv"
  gallery_path = out_dir / f"{rs.name}_gallery.csv"
  release_format.write_pairs(pairs_path, rs.pairs)
  _write_atomic_csv(gallery_path, ("id", "title"), rs.gallery.items())
  return pairs_path, gallery_path


def read_retrieval_set(out_dir: str | os.PathLike, name: str) -> RetrievalSet:
  """Reads what `write_retrieval_set` wrote; every positive must be in the gallery."""
  out_dir = pathlib.Path(out_dir)
  gallery_path = out_dir / f"{name}_gallery.csv"
  with open(gallery_path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    if next(reader, None) != ["id", "title"]:
      raise DataError(f"{gallery_path}: expected header id,title")
    gallery = {row[0]: row[1] for row in reader if row}
  pairs = tuple(release_format.read_pairs(out_dir / f"{name}_pairs.csv",
                                          SkipCounter(f"{name} pairs", strict=True)))
  missing = [p.recall_id for p in pairs if p.recall_id not in gallery]
  if missing:
    raise DataError(f"{gallery_path}: {len(missing)} positives are not in the gallery, "
                    f"e.g. {missing[:3]}")
  return RetrievalSet(name, pairs, gallery)


@dataclasses.dataclass(frozen=True)
class PreparedData:
  train_pairs: pathlib.Path
  heldout: dict[str, RetrievalSet]
  counts: dict
  validation: dict[str, RetrievalSet] = dataclasses.field(default_factory=dict)


def prepare(data_root: str | os.PathLike, out_dir: str | os.PathLike,
            holdout_fraction: float = 0.3, seed: int = 0, strict: bool = False,
            validation_fraction: float = 0.0) -> PreparedData:
  """Writes `train_pairs.csv` (all three sets' training pairs), the held-out tasks and,
  with `validation_fraction` > 0, the validation tasks (`<out_dir>/validation/`)."""
  out_dir = pathlib.Path(out_dir)
  sets = [load_amazon_google(data_root, holdout_fraction, seed, strict, validation_fraction),
          load_walmart_amazon(data_root, strict, validation_fraction, seed),
          load_promap_en_cz(data_root, strict)]
  train = [p for s in sets for p in s.train]
  train_path = out_dir / "train_pairs.csv"
  release_format.write_pairs(train_path, train)
  heldout, validation = {}, {}
  for s in sets:
    if s.heldout is not None:
      write_retrieval_set(out_dir / "heldout", s.heldout)
      heldout[s.name] = s.heldout
    if s.validation is not None:
      write_retrieval_set(out_dir / "validation", s.validation)
      validation[s.name] = s.validation
  counts = {s.name: {"train_pairs": len(s.train),
                     "heldout_queries": len(s.heldout.pairs) if s.heldout else 0,
                     "gallery": len(s.heldout.gallery) if s.heldout else 0,
                     "validation_queries": len(s.validation.pairs) if s.validation else 0,
                     "validation_gallery": len(s.validation.gallery) if s.validation else 0,
                     "dropped_overlapping_heldout": s.dropped_overlapping_heldout,
                     "skips": s.skips} for s in sets}
  return PreparedData(train_path, heldout, counts, validation)
