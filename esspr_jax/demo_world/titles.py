"""Supplier-written listing titles: each supplier has habits, every title is noisy.

A supplier picks a template, a letter case, how much detail it gives and how often it
mistypes. Per title: attributes are mentioned with the attribute's own probability
(scaled by the supplier's detail), sometimes wrongly, in a shuffled order, with
synonyms, marketing words and typos around them.
"""
import dataclasses

import numpy as np

from esspr_jax.demo_world.world_vocab import (NOISE_WORDS, SUPPLIER_SUFFIXES, SUPPLIER_WORDS,
                                        Category)

TEMPLATES = (
    "{noise} {attrs} {noun} {use}",
    "{noun} {attrs} {use}",
    "{brand} {noun} - {attrs}",
    "{attrs} {noun} {noise}",
    "{use} {noun} {attrs} {noise}",
    "{noise} {noun} {use} {attrs}",
)
CASES = ("keep", "keep", "lower", "title", "upper")


@dataclasses.dataclass(frozen=True)
class Supplier:
  supplier_id: str
  name: str
  watermark: str
  template: str
  case: str
  detail: float      # scales every attribute's mention probability
  typo_rate: float   # scales the world's typo probability


def _pick(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def make_supplier(index: int, rng: np.random.Generator) -> Supplier:
  word = _pick(rng, SUPPLIER_WORDS)
  name = f"{_pick(rng, SUPPLIER_WORDS)} {word} {_pick(rng, SUPPLIER_SUFFIXES)}"
  return Supplier(supplier_id=f"SUP{index:04d}", name=name, watermark=word.upper(),
                  template=_pick(rng, TEMPLATES), case=_pick(rng, CASES),
                  detail=float(rng.uniform(0.75, 1.1)), typo_rate=float(rng.uniform(0.3, 1.7)))


def add_typo(word: str, rng: np.random.Generator) -> str:
  """Swaps, drops or doubles one inner letter."""
  if len(word) < 4:
    return word
  i = int(rng.integers(1, len(word) - 2))
  kind = int(rng.integers(3))
  if kind == 0:
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]
  if kind == 1:
    return word[:i] + word[i + 1:]
  return word[:i] + word[i] + word[i:]


def _mention(attr, value: str, rng: np.random.Generator) -> str:
  if attr.wrong_prob and rng.random() < attr.wrong_prob:
    others = [v for v in attr.values if v != value]
    value = _pick(rng, others)
  return _pick(rng, attr.phrases[value])


def write_title(category: Category, attributes: dict, supplier: Supplier,
                rng: np.random.Generator, typo_prob: float, noise_word_prob: float) -> str:
  mentions = [_mention(a, attributes[a.name], rng) for a in category.attributes
              if rng.random() < min(1.0, a.title_prob * supplier.detail)]
  order = rng.permutation(len(mentions))
  attrs = " ".join(mentions[i] for i in order)
  noise = ""
  if rng.random() < noise_word_prob:
    noise = " ".join(_pick(rng, NOISE_WORDS) for _ in range(int(rng.integers(1, 3))))
  use = _pick(rng, category.uses) if rng.random() < 0.7 else ""
  title = supplier.template.format(noise=noise, attrs=attrs, noun=_pick(rng, category.nouns),
                                   use=use, brand=supplier.watermark.title())
  words = title.split()
  while words and words[-1] == "-":
    words.pop()
  if words and rng.random() < min(1.0, typo_prob * supplier.typo_rate):
    alpha = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 4]
    if alpha:
      i = _pick(rng, alpha)
      words[i] = add_typo(words[i], rng)
  title = " ".join(words)
  if supplier.case == "lower":
    return title.lower()
  if supplier.case == "upper":
    return title.upper()
  if supplier.case == "title":
    return title.title()
  return title
