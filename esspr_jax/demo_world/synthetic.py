"""The built-in demo world: a seeded marketplace with a catalog, click log and eval set.

`generate_world(config.data.world, out_dir)` writes
  catalog.csv       every listing: listing_id, style_id (hidden truth), supplier_id,
                    cate_lv1_name, cate_name, title, image (path relative to out_dir)
  styles.csv        hidden truth per style: category, split (train/eval), attributes
  clicklog.csv      search sessions over train styles only (schema: clicklog.py)
  eval_pairs.csv    release-format same-style pairs over eval styles only
  composed_pairs.csv  annotated modification triplets over train styles, in the release
                    format: trigger = a reference photo + a few words naming one changed
                    visible attribute ("blue"), recall = a listing that has it (the
                    composed-query training data behind interactive search; only when
                    world.composed_per_style > 0)
  images/           one rendered photo per listing
  manifest.json     seed, config, counts; written last, so its presence means complete
The same seed gives byte-identical files. Why the world needs both modalities is
explained in world_vocab.py.
"""
import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import pathlib
import time

import numpy as np

from esspr_jax.atomic_io import atomic_open
from esspr_jax.config.data import validate_world, world_config
from esspr_jax.demo_world import click_model, render, world_vocab
from esspr_jax.demo_world.titles import make_supplier, write_title
from esspr_jax.ingest.catalog import Listing, write_catalog
from esspr_jax.ingest.clicklog import COLUMNS as CLICK_COLUMNS
from esspr_jax.ingest.clicklog import write_csv_atomic
from esspr_jax.ingest.release_format import PairRow, write_pairs

FORMAT_VERSION = 1
# Independent random streams, so changing one part (e.g. sessions) leaves the others be.
(_STREAM_STYLES, _STREAM_SUPPLIERS, _STREAM_LISTING, _STREAM_CLICKS, _STREAM_EVAL,
 _STREAM_COUNTS, _STREAM_COMPOSED) = range(7)
# How an annotator phrases a change; {w} is one of the value's title phrasings.
MODIFIER_TEMPLATES = ("{w}", "{w}", "{w}", "in {w}", "{w} one", "{w} version", "but {w}")


@dataclasses.dataclass(frozen=True)
class WorldPaths:
  out_dir: pathlib.Path
  catalog: pathlib.Path
  styles: pathlib.Path
  clicklog: pathlib.Path
  eval_pairs: pathlib.Path
  images: pathlib.Path
  manifest: pathlib.Path

  @property
  def composed_pairs(self) -> pathlib.Path:
    return self.out_dir / "composed_pairs.csv"

  @property
  def train_pairs(self) -> pathlib.Path:
    """Where the demo writes mined pairs (image paths then resolve against out_dir)."""
    return self.out_dir / "train_pairs.csv"

  @classmethod
  def under(cls, out_dir) -> "WorldPaths":
    d = pathlib.Path(out_dir)
    return cls(d, d / "catalog.csv", d / "styles.csv", d / "clicklog.csv",
               d / "eval_pairs.csv", d / "images", d / "manifest.json")


@dataclasses.dataclass(frozen=True)
class Style:
  style_id: str
  category: world_vocab.Category
  attributes: dict
  split: str   # 'train' or 'eval'


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def selected_categories(cfg) -> list:
  names = [n.strip() for n in cfg.categories.split(",") if n.strip()]
  return [world_vocab.CATEGORY_BY_NAME[n] for n in names] or list(world_vocab.CATEGORIES)


def _ordered_combinations(category, rng) -> list[dict]:
  """All styles of a category, ordered round-robin over the primary-attribute groups
  (so the first k styles cover as many primary combinations as possible)."""
  groups = {}
  for combo in world_vocab.combinations(category):
    groups.setdefault(tuple(combo[p] for p in category.primary), []).append(combo)
  primary_order = list(itertools.product(
      *[category.attribute(p).values for p in category.primary]))
  queues = []
  for key in primary_order:
    members = groups[key]
    queues.append([members[i] for i in rng.permutation(len(members))])
  out = []
  for depth in range(max(len(q) for q in queues)):
    out.extend(q[depth] for q in queues if depth < len(q))
  return out


def make_styles(cfg) -> list[Style]:
  cats = selected_categories(cfg)
  base, extra = divmod(cfg.num_styles, len(cats))
  styles = []
  for ci, cat in enumerate(cats):
    rng = _rng(cfg.seed, _STREAM_STYLES, ci)
    n = base + (ci < extra)
    chosen = _ordered_combinations(cat, rng)[:n]
    n_eval = min(n - 1, max(1, int(round(n * cfg.eval_style_fraction))))
    eval_positions = set(rng.permutation(n)[:n_eval].tolist())
    for k, attrs in enumerate(chosen):
      styles.append(Style(f"ST{len(styles):05d}", cat, attrs,
                          "eval" if k in eval_positions else "train"))
  return styles


def _canonical_name(style: Style) -> str:
  return ";".join(f"{k}={v}" for k, v in style.attributes.items())


def _save_image(img, path: pathlib.Path, cfg) -> None:
  if cfg.image_format == "jpeg":
    img.save(path, "JPEG", quality=cfg.jpeg_quality)
  else:
    img.save(path, "PNG")


def _style_listings(cfg, si: int, style: Style, suppliers: list, first_id: int, count: int,
                    images_dir: pathlib.Path) -> list[Listing]:
  """The `count` listings of one style: its own random stream, so styles render in any
  order (or process) with identical results."""
  rng = _rng(cfg.seed, _STREAM_LISTING, si)
  ext = "jpg" if cfg.image_format == "jpeg" else "png"
  out = []
  for k, sup_index in enumerate(sorted(rng.choice(len(suppliers), size=count,
                                                  replace=False).tolist())):
    supplier = suppliers[sup_index]
    listing_id = f"L{first_id + k:06d}"
    title = write_title(style.category, style.attributes, supplier, rng, cfg.typo_prob,
                        cfg.noise_word_prob)
    mark = supplier.watermark if rng.random() < cfg.watermark_prob else None
    img = render.render_listing(style.category.renderer, style.attributes, cfg.image_size,
                                rng, watermark=mark)
    _save_image(img, images_dir / f"{listing_id}.{ext}", cfg)
    out.append(Listing(listing_id, supplier.supplier_id, style.category.industry,
                       style.category.name, title, f"images/{listing_id}.{ext}", style.style_id))
  return out


_WORKER_ARGS = None


def _init_worker(args) -> None:
  global _WORKER_ARGS
  _WORKER_ARGS = args


def _render_job(job) -> list[Listing]:
  cfg, styles, suppliers, images_dir = _WORKER_ARGS
  si, first_id, count = job
  return _style_listings(cfg, si, styles[si], suppliers, first_id, count, images_dir)


def make_listings(cfg, styles: list[Style], images_dir: pathlib.Path) -> list[Listing]:
  """All listings, rendered in `cfg.num_workers` processes (0: one per core)."""
  sup_rng = _rng(cfg.seed, _STREAM_SUPPLIERS)
  suppliers = [make_supplier(i, sup_rng) for i in range(cfg.num_suppliers)]
  count_rng = _rng(cfg.seed, _STREAM_COUNTS)
  counts = count_rng.integers(cfg.min_suppliers_per_style, cfg.max_suppliers_per_style + 1,
                              size=len(styles)).tolist()
  firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
  jobs = list(zip(range(len(styles)), firsts, counts))
  workers = cfg.num_workers or os.cpu_count() or 1
  args = (cfg, styles, suppliers, images_dir)
  if workers <= 1 or len(jobs) < 64:
    _init_worker(args)
    chunks = [_render_job(j) for j in jobs]
  else:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX
    with ctx.Pool(workers, initializer=_init_worker, initargs=(args,)) as pool:
      chunks = pool.map(_render_job, jobs, chunksize=16)
  return [x for chunk in chunks for x in chunk]


def _listings_by_style(listings: list[Listing]) -> dict[str, list[Listing]]:
  by_style = {}
  for x in listings:
    by_style.setdefault(x.style_id, []).append(x)
  return by_style


def make_clicklog(cfg, styles: list[Style], listings: list[Listing]) -> tuple[list, dict]:
  by_style = _listings_by_style(listings)
  indexes = []
  for cat in selected_categories(cfg):
    train = [s for s in styles if s.category is cat and s.split == "train"]
    rows = [(x.listing_id, x.supplier_id, pos) for pos, s in enumerate(train)
            for x in by_style[s.style_id]]
    indexes.append(click_model.build_index(cat, [s.attributes for s in train], rows))
  rng = _rng(cfg.seed, _STREAM_CLICKS)
  rows = click_model.simulate_sessions(indexes, cfg, rng)
  return click_model.corrupt_rows(rows, cfg.corrupt_row_fraction, rng)


def make_eval_pairs(cfg, styles: list[Style], listings: list[Listing]) -> list[PairRow]:
  by_style = _listings_by_style(listings)
  pairs = []
  for si, style in enumerate(styles):
    if style.split != "eval":
      continue
    rng = _rng(cfg.seed, _STREAM_EVAL, si)
    members = by_style[style.style_id]
    combos = list(itertools.combinations(range(len(members)), 2))
    for ci in rng.permutation(len(combos))[:cfg.eval_pairs_per_style]:
      a, b = combos[ci]
      if rng.random() < 0.5:
        a, b = b, a
      t, r = members[a], members[b]
      pairs.append(PairRow(t.cate_lv1_name, t.cate_name, t.listing_id, t.title, r.listing_id,
                           r.title, t.image, r.image, 1))
  return pairs


def modification_targets(styles: list[Style], reference: Style, attribute: str) -> list[Style]:
  """Train styles that differ from `reference` in `attribute` and agree with it on the
  category's other visible primary attributes (what "the same, but blue" means)."""
  cat = reference.category
  keep = [p for p in cat.primary if p != attribute and cat.attribute(p).visible]
  return [s for s in styles if s.category is cat and s.split == "train"
          and s.attributes[attribute] != reference.attributes[attribute]
          and all(s.attributes[p] == reference.attributes[p] for p in keep)]


def make_composed_pairs(cfg, styles: list[Style], listings: list[Listing]) -> list[PairRow]:
  """`cfg.composed_per_style` modification triplets per train style, like the annotated
  sets composed-retrieval models learn from (FashionIQ, CIRR): a reference listing's
  photo + a phrase naming a new value of one visible primary attribute -> a listing of a style
  with that value and the reference's other visible primary attributes. The trigger id
  `<listing>~<attribute>=<value>` names the query; its image is the reference's."""
  per_style = cfg.get("composed_per_style", 0)
  if not per_style:
    return []
  by_style = _listings_by_style(listings)
  train_styles = {}  # category name -> its train styles, the only possible targets
  for st in styles:
    if st.split == "train":
      train_styles.setdefault(st.category.name, []).append(st)
  rows, seen = [], set()
  for si, style in enumerate(styles):
    if style.split != "train":
      continue
    rng = _rng(cfg.seed, _STREAM_COMPOSED, si)
    # A change must leave something of the photo to keep: categories whose style shows
    # in two or more primary attributes (mugs: colour x shape), not a stock photo.
    visible = [p for p in style.category.primary if style.category.attribute(p).visible]
    if len(visible) < 2:
      continue
    for _ in range(per_style):
      attribute = visible[int(rng.integers(len(visible)))]
      targets = modification_targets(train_styles[style.category.name], style, attribute)
      if not targets:
        continue
      target_style = targets[int(rng.integers(len(targets)))]
      value = target_style.attributes[attribute]
      phrases = style.category.attribute(attribute).phrases[value]
      words = phrases[int(rng.integers(len(phrases)))]
      text = MODIFIER_TEMPLATES[int(rng.integers(len(MODIFIER_TEMPLATES)))].format(w=words)
      ref_options, target_options = by_style[style.style_id], by_style[target_style.style_id]
      ref = ref_options[int(rng.integers(len(ref_options)))]
      target = target_options[int(rng.integers(len(target_options)))]
      query_id = f"{ref.listing_id}~{attribute}={value}"
      if (query_id, target.listing_id) in seen:  # the dataset builder would drop it
        continue
      seen.add((query_id, target.listing_id))
      rows.append(PairRow(ref.cate_lv1_name, ref.cate_name, query_id, text,
                          target.listing_id, target.title, ref.image, target.image, 1))
  return rows


def _write_json_atomic(path: pathlib.Path, obj) -> None:
  with atomic_open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def generate_world(cfg, out_dir) -> WorldPaths:
  """Writes the demo world under out_dir (see module doc) and returns its paths."""
  validate_world(cfg)
  paths = WorldPaths.under(out_dir)
  paths.images.mkdir(parents=True, exist_ok=True)
  if paths.manifest.exists():
    paths.manifest.unlink()  # an interrupted rerun must not look complete
  styles = make_styles(cfg)
  listings = make_listings(cfg, styles, paths.images)
  write_catalog(paths.catalog, listings)
  write_csv_atomic(paths.styles, ("style_id", "cate_lv1_name", "cate_name", "split",
                                  "attributes"),
                   ([s.style_id, s.category.industry, s.category.name, s.split,
                     _canonical_name(s)] for s in styles))
  rows, corrupted = make_clicklog(cfg, styles, listings)
  write_csv_atomic(paths.clicklog, CLICK_COLUMNS, rows)
  eval_pairs = make_eval_pairs(cfg, styles, listings)
  write_pairs(paths.eval_pairs, eval_pairs)
  composed = make_composed_pairs(cfg, styles, listings)
  if composed:
    write_pairs(paths.composed_pairs, composed)
  cats = selected_categories(cfg)
  manifest = {
      "format_version": FORMAT_VERSION,
      "seed": cfg.seed,
      "config": cfg.to_dict(),
      "industries": sorted({c.industry for c in cats}),
      "categories": [c.name for c in cats],
      "counts": {
          "styles": len(styles),
          "train_styles": sum(s.split == "train" for s in styles),
          "eval_styles": sum(s.split == "eval" for s in styles),
          "listings": len(listings),
          "suppliers": cfg.num_suppliers,
          "sessions": cfg.num_sessions,
          "clicklog_rows": len(rows),
          "clicks": sum(1 for r in rows if len(r) == len(CLICK_COLUMNS) and r[9] == 1),
          "corrupted_rows": corrupted,
          "eval_pairs": len(eval_pairs),
          "composed_pairs": len(composed),
      },
      "files": {k: pathlib.Path(getattr(paths, k)).name
                for k in ("catalog", "styles", "clicklog", "eval_pairs", "images")},
  }
  _write_json_atomic(paths.manifest, manifest)
  return paths


def main(argv=None) -> None:
  """`python -m esspr_jax.demo_world.synthetic OUT_DIR [--preset demo] [--seed N]`"""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir")
  parser.add_argument("--preset", default="demo", choices=("tiny", "demo", "base", "large"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_styles", type=int, default=None)
  args = parser.parse_args(argv)
  cfg = world_config(args.preset)
  cfg.seed = args.seed
  if args.num_styles:
    cfg.num_styles = args.num_styles
  start = time.perf_counter()
  paths = generate_world(cfg, args.out_dir)
  counts = json.loads(paths.manifest.read_text())["counts"]
  print(f"wrote {paths.out_dir} in {time.perf_counter() - start:.1f}s: "
        + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
  main()
