"""The prefetch thread: order, the consumed data position, run-ahead, errors, and a
checkpoint of the consumed position resuming at the right batch."""
import time

import grain
import jax
import numpy as np
import pytest

from esspr_jax import checkpoint, prefetch


def _dataset(fail_at=-1):
  def load(i):
    if i == fail_at:
      raise ValueError(f"bad record {i}")
    return {"x": np.full((2,), i, np.int32)}
  return grain.MapDataset.range(100).map(load)


def _wait_until(predicate, timeout=10.0):
  deadline = time.time() + timeout
  while not predicate() and time.time() < deadline:
    time.sleep(0.01)
  return predicate()


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_in_order_each_with_the_position_right_after_it(depth):
  reference = iter(_dataset())
  source = iter(_dataset())
  with prefetch.Prefetcher(source, jax.device_put, depth) as batches:
    for i in range(6):
      batch, position = next(batches)
      want = next(reference)
      np.testing.assert_array_equal(np.asarray(batch["x"]), want["x"])
      assert isinstance(batch["x"], jax.Array)  # built on the devices by the thread
      assert position.get_state() == prefetch.DataPosition(reference.get_state()).get_state()
      assert batches.consumed is position


def test_the_thread_runs_ahead_but_the_consumed_position_does_not():
  source = iter(_dataset())
  with prefetch.Prefetcher(source, lambda b: b, depth=2) as batches:
    next(batches)
    # 2 queued + 1 built and waiting for room: the iterator is 4 batches in.
    assert _wait_until(lambda: source.get_state()["next_index"] == 4)
    assert batches.consumed.get_state() == prefetch.DataPosition({"next_index": 1}).get_state()


def test_an_iterator_error_surfaces_at_its_batch():
  with prefetch.Prefetcher(iter(_dataset(fail_at=2)), lambda b: b, depth=2) as batches:
    assert [int(next(batches)[0]["x"][0]) for _ in range(2)] == [0, 1]
    for _ in range(2):  # and at every later call
      with pytest.raises(ValueError, match="bad record 2"):
        next(batches)


def test_checkpointed_consumed_position_resumes_at_the_next_unconsumed_batch(tmp_path):
  source = iter(_dataset())
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
  with prefetch.Prefetcher(source, lambda b: b, depth=3) as batches:
    for _ in range(3):
      _, position = next(batches)
    assert _wait_until(lambda: source.get_state()["next_index"] > 3)  # ahead of the step
    state = {"w": jax.numpy.ones(2)}
    assert ckpt.save(3, state, position)
  ckpt.wait()
  fresh = iter(_dataset())
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  ckpt.restore(3, abstract, fresh)
  assert int(next(fresh)["x"][0]) == 3
  ckpt.close()
