"""Exact search against NumPy, ScaNN against exact on clustered data, save/load round trips."""
import os

import numpy as np
import pytest

from esspr_jax.config import eval as eval_config
from esspr_jax.errors import DataError
from esspr_jax.retrieval import index, metrics


def clustered(n, dim, clusters, seed, spread=0.35):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(clusters, dim))
  x = centers[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  gallery = clustered(3000, 24, 40, seed=0)
  queries = clustered(300, 24, 40, seed=1)
  return gallery, queries


@pytest.fixture(scope="module")
def exact(data):
  return index.ExactIndex(data[0], query_chunk=128, gallery_chunk=512)


def test_exact_search_matches_numpy(data, exact):
  gallery, queries = data
  ids, scores = exact.search(queries, 20)
  dense = queries @ gallery.T
  ref = np.argsort(-dense, axis=1, kind="stable")[:, :20]
  np.testing.assert_array_equal(ids, ref)
  np.testing.assert_allclose(scores, np.take_along_axis(dense, ref, axis=1), rtol=1e-5, atol=1e-6)


def test_exact_full_ranks_match_dense_reference_with_exact_ties(data, exact):
  gallery, queries = data
  # Queries equal to gallery rows make bit-exact ties with their duplicates below.
  dup = index.ExactIndex(np.concatenate([gallery, gallery[:50]]), query_chunk=128, gallery_chunk=512)
  q = np.concatenate([queries[:40], gallery[:10]])
  rng = np.random.default_rng(3)
  target = rng.integers(-1, len(gallery), size=len(q))
  target[40:] = np.arange(10)        # positive has an identical twin at 3000 + i
  ignore = np.full((len(q), 2), metrics.ABSENT)
  ignore[:5, 0] = target[:5]         # ignoring the positive itself changes nothing
  ranks = dup.ranks(q, target, ignore)
  dense = q @ dup.vectors.T
  np.testing.assert_array_equal(ranks, metrics.pessimistic_ranks(dense, target, ignore))
  assert np.all(ranks[40:] == 2)     # the twin ties and counts against the positive
  assert np.all(np.isinf(ranks[target == metrics.ABSENT]))


def test_exact_small_gallery_pads_with_minus_one():
  small = index.ExactIndex(np.eye(3, dtype=np.float32))
  ids, scores = small.search(np.eye(3, dtype=np.float32)[:1], 5)
  np.testing.assert_array_equal(ids, [[0, 1, 2, -1, -1]])
  assert np.isneginf(scores[0, 3:]).all()


def test_dimension_mismatch_and_nan_are_clear_errors(exact):
  with pytest.raises(DataError, match="dimension 7 does not match the index dimension 24"):
    exact.search(np.zeros((2, 7), np.float32), 5)
  with pytest.raises(DataError, match="NaN"):
    index.ExactIndex(np.full((4, 3), np.nan, np.float32))


def index_config(exact_max_gallery=0):
  c = eval_config.default_config("tiny").index
  c.exact_max_gallery = exact_max_gallery
  c.scann.target_recall = 0.95
  c.scann.tune_queries = 200
  return c


@pytest.fixture(scope="module")
def scann_built(data):
  gallery, queries = data
  return index.build_index(gallery, index_config(), tune_queries=queries[:200])


def test_scann_agrees_with_exact_on_clustered_data(data, exact, scann_built):
  gallery, queries = data
  scann_index, report = scann_built
  assert report["kind"] == "scann"
  assert report["recall"] >= 0.95
  held_out = queries[200:]
  approx_ids, approx_scores = scann_index.search(held_out, 20)
  exact_ids, exact_scores = exact.search(held_out, 20)
  assert metrics.recall_vs_exact(approx_ids, exact_ids) >= 0.9
  # Reordered scores are exact dot products of the returned items.
  np.testing.assert_allclose(approx_scores, np.einsum("qd,qkd->qk", held_out, gallery[approx_ids]),
                             rtol=1e-4, atol=1e-5)


def test_small_gallery_uses_exact(data):
  idx, report = index.build_index(data[0][:100], index_config(exact_max_gallery=1000))
  assert report["kind"] == "exact" and isinstance(idx, index.ExactIndex)


def test_save_load_round_trip_survives_a_move(tmp_path, data, scann_built):
  queries = data[1][:20]
  scann_index, _ = scann_built
  small = index.ExactIndex(data[0][:500])
  for name, idx in (("scann", scann_index), ("exact", small)):
    index.save_index(idx, tmp_path / name)
    index.save_index(idx, tmp_path / name)  # overwriting an existing index is atomic too
    os.rename(tmp_path / name, tmp_path / (name + "_moved"))
    loaded = index.load_index(tmp_path / (name + "_moved"))
    assert loaded.kind == idx.kind and loaded.size == idx.size and loaded.dim == idx.dim
    a, sa = idx.search(queries, 10)
    b, sb = loaded.search(queries, 10)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exact_moved", "scann_moved"]
  with pytest.raises(DataError, match="not an index directory"):
    index.load_index(tmp_path)


def test_a_save_killed_mid_way_leaves_the_old_index_and_the_next_save_cleans(tmp_path, data):
  """25.21: the old index was renamed aside before the new one came in (a window with
  none), and a save killed mid-way left its `.tmp-*` dir for good. Now the old index
  stays whole until one atomic exchange; the next save removes the stale temp dir."""
  old, new = index.ExactIndex(data[0][:50]), index.ExactIndex(data[0][50:120])
  index.save_index(old, tmp_path / "m")
  stale = tmp_path / "m.tmp-killed"          # as a save killed before its swap leaves it
  stale.mkdir()
  (stale / "vectors.npy").write_bytes(b"half")
  assert index.load_index(tmp_path / "m").size == 50
  index.save_index(new, tmp_path / "m")
  assert index.load_index(tmp_path / "m").size == 70
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("size,chunk,k", [(3000, 512, 20), (2049, 256, 7), (700, 4096, 5)])
def test_block_topk_equals_direct_topk_with_ties_and_padding(size, chunk, k):
  g = clustered(size, 16, 10, seed=size)
  g[size // 2:size // 2 + 40] = g[:40]           # exact duplicates: tied scores
  q = np.concatenate([g[:30], clustered(50, 16, 10, seed=1)])
  gallery = index.ExactIndex(g, query_chunk=64, gallery_chunk=chunk)
  padded = gallery._gallery
  for start in range(0, len(q), 64):
    part = np.zeros((64, 16), np.float32)
    part[:len(q[start:start + 64])] = q[start:start + 64]
    direct = index._topk_direct(part, padded, size, k)
    blocks = index._topk_blocks(part, padded, size, k, index.BLOCK, 32) \
        if padded.shape[1] % index.BLOCK == 0 else direct
    np.testing.assert_array_equal(np.asarray(blocks[1]), np.asarray(direct[1]))
    np.testing.assert_allclose(np.asarray(blocks[0]), np.asarray(direct[0]), rtol=1e-6, atol=1e-6)
  ids, _ = gallery.search(q, k)
  dense = q @ g.T
  ref = np.argsort(-dense, axis=1, kind="stable")[:, :k]
  # Same scores as numpy's top-k; near-ties one float ulp apart may come in either
  # order (XLA and BLAS sum in different orders), so scores match to 1e-6.
  np.testing.assert_allclose(np.take_along_axis(dense, ids, 1), np.take_along_axis(dense, ref, 1),
                             rtol=0, atol=1e-6)
  assert all(len(set(row)) == k for row in ids.tolist())   # no row returned twice


def test_live_index_equals_exact_search_over_live_rows(data):
  gallery, queries = data
  base, extra = gallery[:2500], gallery[2500:]
  rng = np.random.default_rng(7)
  retired = np.zeros(len(base), bool)
  retired[rng.choice(len(base), 400, replace=False)] = True
  live = index.LiveIndex(index.ExactIndex(base, 128, 512), index.ExactIndex(extra, 128, 512), retired)
  assert live.size == 2100 + 500
  rows = np.concatenate([np.nonzero(~retired)[0], len(base) + np.arange(len(extra))])
  ref_ids, ref_scores = index.ExactIndex(gallery[rows], 128, 512).search(queries, 30)
  ids, scores = live.search(queries, 30)
  np.testing.assert_array_equal(ids, rows[ref_ids])
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
  assert not retired[ids[ids < len(base)]].any()
  all_ids, _ = live.search(queries[:5], 4000)        # more than the live rows: -1 padded
  assert (all_ids[:, :live.size] >= 0).all() and (all_ids[:, live.size:] == -1).all()
