"""The grocery recipe's product split, its --photos input and its evaluation plumbing."""
import csv

import jax.numpy as jnp
import numpy as np
import pytest

from esspr_jax.errors import DataError
from esspr_jax.recipes import grocery_photos as gp


@pytest.fixture(scope="module")
def split(shared_data):
  return gp.load_grocery(shared_data)


def test_split_is_by_product_and_odd_products_are_never_trained_on(split, shared_data):
  with open(shared_data / "grocery_store" / "metadata.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert len(split.listings) == 81 == len({x.group_id for x in split.listings})
  assert all(p.group_id % 2 == 0 for p in split.train_photos)
  assert all(q.group_id % 2 == 1 for q in split.queries)
  assert len(split.train_photos) == sum(
      1 for r in rows if r["split"] == "train" and int(r["group_id"]) % 2 == 0)
  assert len(split.queries) == sum(
      1 for r in rows if r["split"] == "val" and int(r["group_id"]) % 2 == 1)
  assert {p.path for p in split.train_photos}.isdisjoint({q.path for q in split.queries})
  source = gp.train_source(gp.GrocerySplit(split.root, split.listings, split.train_photos[:3],
                                           split.queries))
  for example, photo in zip(source, split.train_photos[:3]):
    assert example["recall"]["id"] == f"listing/{photo.group_id}"
    assert example["trigger"]["image"][:2] == b"\xff\xd8"  # the photo's JPEG bytes


def test_photos_csv_replaces_the_photo_list_and_is_checked(split, shared_data, tmp_path):
  chosen = [q for q in split.queries][:5]
  path = tmp_path / "photos.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, ["image_path", "split", "group_id"])
    w.writeheader()
    for q in chosen:
      w.writerow({"image_path": q.path, "split": "val", "group_id": q.group_id})
    w.writerow({"image_path": chosen[0].path, "split": "val", "group_id": 0})  # even: not a query
  other = gp.load_grocery(shared_data, path)
  assert [q.path for q in other.queries] == [q.path for q in chosen]
  assert other.listings == split.listings and not other.train_photos
  path.write_text("image_path,group_id\nx.jpg,1\n")
  with pytest.raises(DataError, match="split"):
    gp.load_grocery(shared_data, path)
  path.write_text("image_path,split,group_id\nx.jpg,val,999\n")
  with pytest.raises(DataError, match="999"):
    gp.load_grocery(shared_data, path)


def test_evaluation_ranks_queries_against_all_listings(split, shared_data, tmp_path):
  """Queries that are the odd listings' own studio images, embedded by their pixels, must
  each find their listing at rank 1 (i-i and i-m) among all 81: the real decode, batch
  padding and ranking path, with an embedder whose answer is known."""
  from esspr_jax.models.tokenizer import tokenizer_from_config
  path = tmp_path / "photos.csv"
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, ["image_path", "split", "group_id"])
    w.writeheader()
    for x in split.listings:
      if x.group_id % 2:
        w.writerow({"image_path": x.path, "split": "val", "group_id": x.group_id})
  own = gp.load_grocery(shared_data, path)
  config = gp.recipe_config("vit", steps=1, image_size=32)
  tokenizer = tokenizer_from_config(config.model.tokenizer)

  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-9)

  class KnownEmbedder:
    """A model for the embedding loop whose answer is known: pixels and a bag of words,
    in one space for all views."""
    available = ("i", "t", "m")

    def apply(self, variables, side, train=False, modalities=available):
      del variables, train
      rows = len(side["text_ids"])
      pixels = (unit(side["image"].reshape(rows, -1).astype(jnp.float32) - 128)
                if "image" in side else jnp.zeros((rows, 32 * 32 * 3)))
      words = jnp.zeros((rows, 30522)).at[jnp.arange(rows)[:, None], side["text_ids"]].add(
          side["text_mask"].astype(jnp.float32))
      words = unit(words.at[:, :103].set(0))  # specials and padding
      none_p, none_w = jnp.zeros_like(pixels), jnp.zeros_like(words)
      views = {"i": jnp.concatenate([pixels, none_w], 1),
               "t": jnp.concatenate([none_p, words], 1),
               "m": jnp.concatenate([pixels, words], 1) / np.sqrt(2)}
      return {m: views[m] for m in modalities}

  result = gp.evaluate(KnownEmbedder(), None, own, tokenizer, config)
  assert result["i-i"]["queries"] == result["t-m"]["queries"] == 40
  assert result["i-i"]["mrr"] == 1.0 and result["i-m"]["recall@1"] == 1.0
  assert 0.0 < result["t-m"]["mrr"] <= 1.0
