"""Duplicate detection: the PR sweep and calibration against hand counts and a brute-force
loop, clusters against all-pairs numpy + scipy components, and the failure modes."""
import ml_collections
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from esspr_jax.errors import DataError
from esspr_jax.retrieval import duplicates as dup
from esspr_jax.retrieval import duplicates_clusters as dc


# ----------------------------------------------------------------------------- the sweep
def test_sweep_by_hand_with_ties():
  # scores   0.9  0.8  0.8  0.7  0.6  0.6  0.5
  # labels    1    1    0    1    0    0    1
  s = [0.8, 0.9, 0.6, 0.8, 0.7, 0.5, 0.6]
  y = [1, 1, 0, 0, 1, 1, 0]
  sw = dup.sweep(s, y)
  np.testing.assert_array_equal(sw.thresholds, [0.9, 0.8, 0.7, 0.6, 0.5])  # ties: one each
  np.testing.assert_array_equal(sw.tp, [1, 2, 3, 3, 4])
  np.testing.assert_array_equal(sw.fp, [0, 1, 1, 3, 3])
  assert (sw.positives, sw.negatives) == (4, 3)
  np.testing.assert_allclose(sw.precision, [1, 2 / 3, 3 / 4, 3 / 6, 4 / 7])
  np.testing.assert_allclose(sw.recall, [1 / 4, 2 / 4, 3 / 4, 3 / 4, 1])
  np.testing.assert_allclose(sw.f1, [2 / 5, 4 / 7, 6 / 8, 6 / 10, 8 / 11])
  assert sw.best_f1().threshold == 0.7
  # The smallest threshold at precision >= 0.7 is 0.7 (3 of 4), not 0.9; precision
  # is not monotone, and 0.8 (2/3) in between does not stop it.
  cal = dup.calibrate(s, y, 0.7)
  assert cal.reached and cal.threshold == 0.7 and (cal.point.tp, cal.point.fp) == (3, 1)
  assert dup.calibrate(s, y, 1.0).threshold == 0.9
  assert dup.calibrate(s, y, 0.75).threshold == 0.7   # 3/4 meets 0.75 exactly


def test_sweep_matches_a_brute_force_loop_on_random_data():
  rng = np.random.default_rng(0)
  s = np.round(rng.normal(size=300), 1)     # rounding makes many ties
  y = rng.random(300) < 0.3
  sw = dup.sweep(s, y)
  for j, t in enumerate(sw.thresholds):
    called = s >= t
    assert sw.tp[j] == (called & y).sum() and sw.fp[j] == (called & ~y).sum()
    p = dup.at_threshold(s, y, t)
    assert (p.tp, p.fp, p.positives) == (sw.tp[j], sw.fp[j], y.sum())
  assert list(sw.thresholds) == sorted(set(s.tolist()), reverse=True)
  for target in (0.3, 0.4, 0.5, 0.9):
    ok = [t for t in set(s.tolist()) if (y & (s >= t)).sum() / (s >= t).sum() >= target]
    cal = dup.calibrate(s, y, target)
    assert cal.threshold == (min(ok) if ok else None)


def test_no_threshold_reaching_the_target_is_said_not_invented():
  cal = dup.calibrate([0.9, 0.8, 0.7], [0, 1, 0], 0.95)
  assert not cal.reached and cal.threshold is None
  assert "no threshold reaches precision 0.95" in cal.message
  assert cal.point.precision == 0.5            # the best there is: 0.8 with 1 of 2
  report = cal.as_dict()
  assert report["threshold"] is None and "best_precision_point" in report


def test_point_above_every_score_has_undefined_precision():
  p = dup.at_threshold([0.1, 0.2], [1, 0], 0.5)
  assert (p.tp, p.fp, p.fn, p.recall, p.f1) == (0, 0, 1, 0.0, 0.0)
  assert np.isnan(p.precision) and p.as_dict()["precision"] is None


@pytest.mark.parametrize("scores, labels, match", [
    ([0.5, np.nan], [1, 0], "1 scores are NaN or inf \\(first at pair 1\\)"),
    ([0.5, 0.4], [1, 2], "labels must be 0 or 1, pair 1"),
    ([0.5, 0.4], [0, 0], "none of the 2 pairs is labelled 1"),
    ([0.5, 0.4], [1, 1], "none of the 2 pairs is labelled 0"),  # 25.13
    ([0.5, 0.4], [1], "one score and one label per pair"),
])
def test_bad_pairs_are_named(scores, labels, match):
  with pytest.raises(DataError, match=match):
    dup.calibrate(scores, labels, 0.9)
  with pytest.raises(DataError, match="target precision"):
    dup.calibrate([0.5], [1], 1.5)


# ----------------------------------------------------------------------------- clusters
def _unit(rng, n, d):
  v = rng.normal(size=(n, d))
  return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng, n_centres=12, per=(1, 5), d=16, noise=0.15):
  """Unit vectors around random centres, so there are real clusters to find."""
  centres = _unit(rng, n_centres, d)
  rows = [c + noise * rng.normal(size=d) for c in centres for _ in range(rng.integers(*per))]
  v = np.asarray(rows)
  return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _brute_force(v, threshold, groups=None):
  """All-pairs float64 similarity -> edges -> scipy components (size >= 2)."""
  sim = v.astype(np.float64) @ v.astype(np.float64).T
  n = len(v)
  mask = np.triu(sim >= threshold, 1)
  if groups is not None:
    mask &= np.asarray(groups)[:, None] == np.asarray(groups)[None, :]
  a, b = np.nonzero(mask)
  _, labels = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)),
                                   directed=False)
  comps = {}
  for row, lab in enumerate(labels):
    comps.setdefault(lab, []).append(row)
  return {tuple(c) for c in comps.values() if len(c) >= 2}, {(int(x), int(y)) for x, y in zip(a, b)}


def _safe_threshold(v, rng):
  """A threshold between two distinct pair scores, far from any (float32 vs float64)."""
  sim = np.sort((v.astype(np.float64) @ v.astype(np.float64).T)[np.triu_indices(len(v), 1)])
  gaps = np.flatnonzero((np.diff(sim) > 1e-4) & (sim[1:] > 0.5))
  j = gaps[rng.integers(len(gaps))]
  return float((sim[j] + sim[j + 1]) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scope", ["all", "supplier"])
def test_clusters_match_all_pairs_brute_force(seed, scope):
  rng = np.random.default_rng(seed)
  v = _clustered(rng)
  n = len(v)
  groups = rng.choice(["s0", "s1", "s2"], size=n) if scope == "supplier" else None
  t = _safe_threshold(v, rng)
  want, want_edges = _brute_force(v, t, groups)
  e = dc.edges(v, t, top_k=n, groups=groups)   # k = N: every pair is seen
  assert set(zip(e.a.tolist(), e.b.tolist())) == want_edges
  sim = v.astype(np.float64) @ v.T.astype(np.float64)
  np.testing.assert_allclose(e.score, sim[e.a, e.b], atol=1e-5)
  got = dc.cluster_catalog(v, t, top_k=n, groups=groups)
  assert {tuple(c.rows.tolist()) for c in got} == want
  assert [len(c.rows) for c in got] == sorted((len(c.rows) for c in got), reverse=True)
  for c in got:
    assert c.edges >= len(c.rows) - 1 and t <= c.min_score <= c.max_score
    if groups is not None:
      assert len(set(groups[c.rows])) == 1


def test_small_top_k_only_splits_clusters_never_merges():
  rng = np.random.default_rng(3)
  v = _clustered(rng, n_centres=6, per=(4, 9), noise=0.1)
  t = _safe_threshold(v, rng)
  full = dc.cluster_catalog(v, t, top_k=len(v))
  small = dc.cluster_catalog(v, t, top_k=1)
  assert len(dc.edges(v, t, top_k=1).a) <= len(v)      # at most one edge per listing
  owner = {int(r): i for i, c in enumerate(full) for r in c.rows}
  for c in small:
    assert len({owner[int(r)] for r in c.rows}) == 1   # inside one full cluster


def test_clusters_through_the_retrieval_index_config():
  rng = np.random.default_rng(4)
  v = _clustered(rng)
  t = _safe_threshold(v, rng)
  cfg = ml_collections.ConfigDict({"exact_max_gallery": 10_000, "query_chunk": 16,
                                   "gallery_chunk": 32})
  got = dc.cluster_catalog(v, t, top_k=len(v), index_config=cfg)
  assert {tuple(c.rows.tolist()) for c in got} == _brute_force(v, t)[0]


def test_hand_made_catalog_per_supplier_and_across():
  # rows 0,1 (supplier a) and 2 (supplier b) are one product; 3 (a) stands alone.
  v = np.array([[1, 0], [0.99, 0.141], [0.98, -0.199], [0, 1]], np.float32)
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  sup = np.array(["a", "a", "b", "a"])
  across = dc.cluster_catalog(v, 0.95, top_k=3)
  assert [c.rows.tolist() for c in across] == [[0, 1, 2]]
  per = dc.cluster_catalog(v, 0.95, top_k=3, groups=sup)
  assert [c.rows.tolist() for c in per] == [[0, 1]] and per[0].edges == 1
  assert dc.cluster_catalog(v, 0.999, top_k=3) == []


def test_cluster_failure_modes():
  v = np.eye(3, dtype=np.float32)
  bad = v.copy()
  bad[1, 0] = np.nan
  with pytest.raises(DataError, match="1 embeddings hold NaN or inf \\(first at row 1\\)"):
    dc.cluster_catalog(bad, 0.9, top_k=2)
  with pytest.raises(DataError, match="finite number"):
    dc.cluster_catalog(v, float("nan"), top_k=2)
  with pytest.raises(DataError, match="top_k >= 1"):
    dc.cluster_catalog(v, 0.9, top_k=0)
  with pytest.raises(DataError, match="group labels for 3 embeddings"):
    dc.cluster_catalog(v, 0.9, top_k=2, groups=["a", "b"])
  assert dc.cluster_catalog(v[:1], 0.5, top_k=3) == []
