"""Simulated search sessions: queries, ranked results, position-biased clicks.

A user wants one style; the query names some of its attributes (so it may also match
other styles); the engine ranks the category's listings by a noisy match score and
mixes in results from other categories; the user examines position p with probability
p ** -position_bias and clicks what is examined with an attractiveness that is high for
the wanted style, lower for merely related listings and small for unrelated ones. The
logged relevance is the true query match plus noise. This yields exactly the noise the
mining constraints exist to remove: co-clicks across categories, on barely relevant
listings, and on related but different styles.
"""
import dataclasses

import numpy as np

from esspr_jax.demo_world.world_vocab import Category


@dataclasses.dataclass
class CategoryIndex:
  """The train listings of one category, as arrays for vectorised matching."""
  category: Category
  listing_ids: list
  supplier_ids: list
  style_of_listing: np.ndarray   # int [n] index into the category's train styles
  style_values: np.ndarray       # int [num_styles, num_attributes] value index
  listing_values: np.ndarray     # int [n, num_attributes]


def build_index(category: Category, styles: list[dict], listings: list[tuple]) -> CategoryIndex:
  """styles: attribute dicts; listings: (listing_id, supplier_id, style position)."""
  values = np.array([[a.values.index(s[a.name]) for a in category.attributes] for s in styles],
                    dtype=np.int32).reshape(len(styles), len(category.attributes))
  style_of = np.array([pos for _, _, pos in listings], dtype=np.int32)
  return CategoryIndex(category, [x[0] for x in listings], [x[1] for x in listings], style_of,
                       values, values[style_of])


def _query(index: CategoryIndex, style: int, cfg, rng: np.random.Generator):
  cat = index.category
  named = [j for j in range(len(cat.attributes)) if rng.random() < cfg.query_attribute_prob]
  if rng.random() < cfg.short_query_prob:
    named = named[:1]
  if not named:
    named = [int(rng.integers(len(cat.attributes)))]
  words = []
  for j in named:
    attr = cat.attributes[j]
    value = attr.values[index.style_values[style, j]]
    phrases = attr.phrases[value]
    words.append(phrases[0] if rng.random() < 0.7 else phrases[int(rng.integers(len(phrases)))])
  order = rng.permutation(len(words))
  noun = cat.nouns[0] if rng.random() < 0.6 else cat.nouns[int(rng.integers(len(cat.nouns)))]
  text = " ".join([words[i] for i in order] + [noun]).lower()
  value_words = {cat.attributes[j].values[index.style_values[style, j]] for j in named}
  return text, np.array(named), index.style_values[style, named], value_words


def _off_category_pick(by_value: dict, words: set, c: int, rng: np.random.Generator):
  """A listing of another category that has one of the query's words, or None."""
  pool = [w for w in sorted(words) if w in by_value]
  for _ in range(4):
    if not pool:
      return None
    hits = by_value[pool[int(rng.integers(len(pool)))]]
    pick = hits[int(rng.integers(len(hits)))]
    if pick[0] != c:
      return pick
  return None


def simulate_sessions(indexes: list[CategoryIndex], cfg, rng: np.random.Generator) -> list:
  """Click-log rows (lists in clicklog.COLUMNS order), sessions in time order."""
  # Attribute value -> listings that have it ("red" mugs and dresses, "black" screws and
  # capacitors): where a word-matching engine finds off-category noise.
  by_value = {}
  for c, ix in enumerate(indexes):
    for j, attr in enumerate(ix.category.attributes):
      for i, v in enumerate(ix.listing_values[:, j]):
        by_value.setdefault(attr.values[v], []).append((c, i))
  words_of = [[{a.values[v] for a, v in zip(ix.category.attributes, row)}
               for row in ix.listing_values] for ix in indexes]
  weights = np.array([len(ix.style_values) for ix in indexes], dtype=np.float64)
  weights /= weights.sum()
  n_results, noise_prob = cfg.results_per_session, cfg.noise_result_prob
  p_wanted, p_related, p_unrelated = (cfg.click_prob_wanted, cfg.click_prob_related,
                                      cfg.click_prob_unrelated)
  examine = np.arange(1, n_results + 1, dtype=np.float64) ** (-cfg.position_bias)
  span = cfg.span_days * 86400
  starts = np.sort(rng.integers(0, span, size=cfg.num_sessions)) + cfg.start_timestamp
  categories = rng.choice(len(indexes), size=cfg.num_sessions, p=weights)
  rows = []
  for s in range(cfg.num_sessions):
    c = int(categories[s])
    ix = indexes[c]
    wanted = int(rng.integers(len(ix.style_values)))
    text, named, values, words = _query(ix, wanted, cfg, rng)
    relevance = (ix.listing_values[:, named] == values[None, :]).mean(axis=1)
    score = relevance + rng.normal(0.0, cfg.ranking_noise, size=relevance.shape)
    results = [(c, int(i)) for i in np.argsort(-score, kind="stable")[:n_results]]
    noisy = rng.random(len(results)) < noise_prob
    for p in np.flatnonzero(noisy) if len(indexes) > 1 else ():
      pick = _off_category_pick(by_value, words, c, rng) if rng.random() < 0.5 else None
      if pick is None:
        other = int(rng.integers(len(indexes) - 1))
        other += other >= c
        pick = (other, int(rng.integers(len(indexes[other].listing_ids))))
      results[p] = pick
    rel_noise = rng.normal(0.0, cfg.relevance_noise, size=len(results))
    coins = rng.random(len(results))
    session_id = f"S{s:07d}"
    for p, (cc, i) in enumerate(results):
      oix = indexes[cc]
      if cc == c:
        true_rel = float(relevance[i])
        attract = (p_wanted if int(oix.style_of_listing[i]) == wanted
                   else p_related * true_rel ** 2)
      else:
        # A word-level relevance model is fooled by shared words ("red" dress for "red mug").
        true_rel = len(words & words_of[cc][i]) / len(words)
        attract = p_unrelated
      logged = min(1.0, max(0.0, true_rel + float(rel_noise[p])))
      rows.append([session_id, int(starts[s]) + 2 * (p + 1), text, p + 1, oix.listing_ids[i],
                   oix.supplier_ids[i], oix.category.industry, oix.category.name,
                   f"{logged:.3f}", int(coins[p] < attract * examine[p])])
  return rows


CORRUPTIONS = ("wrong_column_count", "nan_relevance", "out_of_range_relevance",
               "unknown_category", "bad_number", "empty_id", "duplicate_row", "bad_clicked")


def corrupt_rows(rows: list, fraction: float, rng: np.random.Generator) -> tuple[list, dict]:
  """Damages about `fraction` of the rows, cycling through every kind of bad row a
  real log has, so the demo exercises the miner's skip accounting. Returns the new rows
  and a count per kind."""
  out, counts = [], {k: 0 for k in CORRUPTIONS}
  k = 0
  for row in rows:
    if fraction <= 0 or rng.random() >= fraction:
      out.append(row)
      continue
    kind = CORRUPTIONS[k % len(CORRUPTIONS)]
    k += 1
    counts[kind] += 1
    bad = list(row)
    if kind == "wrong_column_count":
      bad = bad[:-1]
    elif kind == "nan_relevance":
      bad[8] = "nan"
    elif kind == "out_of_range_relevance":
      bad[8] = "1.700"
    elif kind == "unknown_category":
      bad[7] = "Unknown Category"
    elif kind == "bad_number":
      bad[3] = "third"
    elif kind == "empty_id":
      bad[4] = ""
    elif kind == "duplicate_row":
      out.append(row)
    elif kind == "bad_clicked":
      bad[9] = "maybe"
    out.append(bad)
  return out, counts
