"""The demo world: seeded determinism, the promised shape, and why both modalities matter."""
import collections
import csv
import hashlib
import itertools
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from esspr_jax import config as config_lib
from esspr_jax.config.data import world_config
from esspr_jax.demo_world import click_model, synthetic, world_vocab
from esspr_jax.ingest import clicklog
from esspr_jax.ingest.clicklog import read_clicklog
from esspr_jax.ingest.release_format import read_pairs
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.errors import ConfigError


def _small(seed: int):
  cfg = world_config("tiny")
  cfg.seed = seed
  cfg.num_styles = 24
  cfg.num_sessions = 60
  cfg.image_size = 24
  return cfg


def _digests(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return synthetic.generate_world(world_config("tiny"), tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="module")
def rows(world):
  with open(world.catalog, newline="", encoding="utf-8") as f:
    catalog = list(csv.DictReader(f))
  with open(world.styles, newline="", encoding="utf-8") as f:
    styles = {r["style_id"]: r for r in csv.DictReader(f)}
  return catalog, styles


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
  a = _digests(synthetic.generate_world(_small(3), tmp_path / "a").out_dir)
  b = _digests(synthetic.generate_world(_small(3), tmp_path / "b").out_dir)
  c = _digests(synthetic.generate_world(_small(4), tmp_path / "c").out_dir)
  assert a == b
  assert len([k for k in a if k.startswith("images/")]) >= 24 * 2
  for name in ("catalog.csv", "clicklog.csv", "eval_pairs.csv"):
    assert a[name] != c[name], name
  shared_images = set(a) & set(c) - {"manifest.json"}
  assert sum(a[k] != c[k] for k in shared_images if k.startswith("images/")) > 0


def test_categories_industries_and_manifest(world, rows):
  catalog, styles = rows
  assert len({r["cate_name"] for r in catalog}) >= 8
  assert len({r["cate_lv1_name"] for r in catalog}) >= 3
  manifest = json.loads(world.manifest.read_text())
  assert manifest["seed"] == 0
  assert manifest["counts"]["listings"] == len(catalog)
  assert manifest["counts"]["styles"] == len(styles) == 96
  assert manifest["counts"]["eval_pairs"] == manifest["counts"]["eval_styles"]


def test_each_style_has_2_to_6_distinct_suppliers_with_own_image(world, rows):
  catalog, _ = rows
  by_style = collections.defaultdict(list)
  for r in catalog:
    by_style[r["style_id"]].append(r)
  counts = [len(v) for v in by_style.values()]
  assert min(counts) >= 2 and max(counts) <= 6 and len(set(counts)) > 1
  for listings in by_style.values():
    assert len({r["supplier_id"] for r in listings}) == len(listings)
  assert len({r["image"] for r in catalog}) == len(catalog)
  img = Image.open(world.out_dir / catalog[0]["image"])
  assert img.size == (32, 32) and img.mode == "RGB"


def test_eval_styles_never_reach_the_click_log(world, rows):
  catalog, styles = rows
  style_of = {r["listing_id"]: r["style_id"] for r in catalog}
  clicks = list(read_clicklog(str(world.clicklog), skips=SkipCounter("log", strict=True)))
  logged_styles = {style_of[c.listing_id] for c in clicks}
  eval_pairs = list(read_pairs(world.eval_pairs))
  eval_styles = {style_of[p.trigger_id] for p in eval_pairs}
  assert eval_styles == {s for s, r in styles.items() if r["split"] == "eval"}
  assert not logged_styles & eval_styles
  assert logged_styles <= {s for s, r in styles.items() if r["split"] == "train"}
  for p in eval_pairs:  # annotated positives: same style, different listings, images exist
    assert style_of[p.trigger_id] == style_of[p.recall_id] and p.trigger_id != p.recall_id
    assert (world.out_dir / p.trigger_img).is_file() and (world.out_dir / p.recall_img).is_file()


def test_click_log_has_cross_style_and_cross_category_co_clicks(world, rows):
  catalog, _ = rows
  info = {r["listing_id"]: r for r in catalog}
  sessions = collections.defaultdict(list)
  for c in read_clicklog(str(world.clicklog)):
    assert info[c.listing_id]["cate_name"] == c.cate_name
    if c.clicked:
      sessions[c.session_id].append(c.listing_id)
  pairs = [(a, b) for ls in sessions.values() for a, b in itertools.combinations(ls, 2)]
  same = sum(info[a]["style_id"] == info[b]["style_id"] for a, b in pairs)
  cross_cat = sum(info[a]["cate_name"] != info[b]["cate_name"] for a, b in pairs)
  assert same > 0 and len(pairs) - same > 0 and cross_cat > 0


def test_mugs_come_in_red_and_blue_of_one_shape_and_titles_name_colour_often(rows):
  catalog, styles = rows
  mug_styles = [dict(kv.split("=") for kv in r["attributes"].split(";"))
                for r in styles.values() if r["cate_name"] == "Mugs"]
  by_shape = collections.defaultdict(set)
  for s in mug_styles:
    by_shape[s["shape"]].add(s["colour"])
  assert any({"red", "blue"} <= colours for colours in by_shape.values())
  colour_words = {w for syn in world_vocab.CATEGORY_BY_NAME["Mugs"].attribute("colour")
                  .phrases.values() for w in syn}
  mug_titles = [r["title"].lower() for r in catalog if r["cate_name"] == "Mugs"]
  named = sum(any(w in t for w in colour_words) for t in mug_titles)
  assert 0.2 * len(mug_titles) < named < len(mug_titles)


def _pixel_distance(world, listings):
  imgs = [np.asarray(Image.open(world.out_dir / r["image"]).convert("L"), np.float32)
          for r in listings]
  return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(imgs, 2)]))


def test_pictures_carry_style_in_image_industries_but_not_in_title_industries(world, rows):
  catalog, styles = rows

  def spread(cate):
    """Mean pixel distance across different styles / within one style."""
    listings = [r for r in catalog if r["cate_name"] == cate]
    by_style = collections.defaultdict(list)
    for r in listings:
      by_style[r["style_id"]].append(r)
    within = np.mean([_pixel_distance(world, v) for v in by_style.values()])
    firsts = [v[0] for v in by_style.values()]
    return _pixel_distance(world, firsts) / within

  assert spread("Mugs") > 1.15 * spread("Resistors")
  assert spread("Resistors") < 1.1  # stock photos: another style looks like another photo


def test_corrupt_rows_cover_every_kind_and_the_reader_counts_them():
  good = [["S1", 10, "q", p, f"L{p}", "SUP1", "Home & Kitchen", "Mugs", "0.900", 1]
          for p in range(1, 401)]
  bad, counts = click_model.corrupt_rows(good, 0.1, np.random.default_rng(0))
  assert all(n > 0 for n in counts.values()), counts
  assert len(bad) == len(good) + counts["duplicate_row"]
  skips = SkipCounter("log")
  index = {name: i for i, name in enumerate(clicklog.COLUMNS)}
  seen = set()
  for n, values in enumerate(bad):
    parsed = clicklog.parse_click([str(v) for v in values], index, len(index),
                                  frozenset({("Home & Kitchen", "Mugs")}))
    if isinstance(parsed, clicklog.BadRow):
      skips.skip(parsed.reason, f"row {n}")
    elif parsed.dedupe_key in seen:
      skips.skip("duplicate_row", f"row {n}")
    else:
      seen.add(parsed.dedupe_key)
      skips.ok()
  assert skips.skipped == sum(counts.values())
  assert skips.reasons["bad_relevance"] == counts["nan_relevance"] + counts[
      "out_of_range_relevance"]


@pytest.mark.parametrize("key,value,match", [
    ("num_styles", 10**6, "distinct styles"),
    ("min_suppliers_per_style", 1, "min_suppliers"),
    ("categories", "Mugs,Spaceships", "Spaceships"),
    ("image_format", "gif", "image_format"),
    ("eval_style_fraction", 1.0, "eval_style_fraction"),
    ("click_prob_wanted", 1.5, "click_prob_wanted"),
])
def test_bad_world_config_names_the_key(key, value, match):
  config = config_lib.compose("tiny")
  config.unlock()
  config.data.world[key] = value
  with pytest.raises(ConfigError, match=match) as err:
    config_lib.data_section.validate(config)
  assert err.value.key == f"data.world.{key}"


def test_every_preset_validates_and_demo_is_demo_sized():
  for preset in config_lib.PRESETS:
    config_lib.data_section.validate(config_lib.compose(preset))
  demo = config_lib.compose("demo").data.world
  assert 600 <= demo.num_styles <= 1000 and demo.image_size == 96
