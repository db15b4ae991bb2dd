"""Grain pipeline (esspr_jax/input/pipeline.py): batch contract, exact resume, per-process
sharding, shuffling, eval padding, catalogs, config wiring."""
import json

import numpy as np
import pytest

from esspr_jax.input import esspr_tfds, images, pipeline, tokenizer_stage
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.models.tokenizer import Tokenizer
from support import write_jpeg

N = 24  # pairs in the test dataset
SIZE = 16  # model image size in these tests
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """N pairs t{i}/r{i}; trigger title 'w{i}', recall title 'v{i}', one colour each."""
  root = tmp_path_factory.mktemp("pipe")
  (root / "img").mkdir()
  rows = ["trigger_id,trigger_title,trigger_img,recall_id,recall_title,recall_img"]
  for i in range(N):
    write_jpeg(root / "img" / f"t{i}.jpg", (10 * i, 255 - 10 * i, 0))
    write_jpeg(root / "img" / f"r{i}.jpg", (0, 10 * i, 255 - 10 * i))
    rows.append(f"t{i},w{i},t{i}.jpg,r{i},v{i},r{i}.jpg")
  (root / "pairs.csv").write_text("\n".join(rows) + "\n")
  ds = esspr_tfds.build_pairs_dataset(root / "pairs.csv", root / "img", root / "tfds",
                                      "train_pairs", max_image_side=64)
  vocab = root / "vocab.txt"
  vocab.write_text("\n".join(SPECIALS + [f"w{i}" for i in range(N)] +
                             [f"v{i}" for i in range(N)]) + "\n")
  return {"root": root, "source": ds.source(), "tokenizer": Tokenizer.from_vocab_txt(vocab)}


def _spec(**kw):
  kw.setdefault("augment", images.AugmentParams())
  return pipeline.PipelineSpec(image_size=SIZE, max_len=4, **kw)


def _trigger_index(batch):
  """Which pair each row is, read back from the trigger title token 'w{i}'."""
  return (batch["trigger"]["text_ids"][:, 1] - len(SPECIALS)).tolist()


def _assert_same(a, b):
  flat_a, flat_b = _leaves(a), _leaves(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    assert np.array_equal(flat_a[k], flat_b[k]), k


def _leaves(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_leaves(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def test_train_batches_follow_the_contract(built):
  it = iter(pipeline.make_train_dataset(built["source"], built["tokenizer"], _spec(), 5,
                                        process_index=0, process_count=1))
  batch = next(it)
  assert set(batch) == {"trigger", "recall", "valid"}
  assert batch["valid"].dtype == bool and batch["valid"].all() and batch["valid"].shape == (5,)
  for side in ("trigger", "recall"):
    s = batch[side]
    assert set(s) == {"image", "text_ids", "text_mask", "text_empty"}
    assert s["image"].shape == (5, SIZE, SIZE, 3) and s["image"].dtype == np.uint8
    assert s["text_ids"].shape == (5, 4) and s["text_ids"].dtype == np.int32
    assert s["text_mask"].dtype == np.int32 and s["text_mask"][:, :3].all()
    assert s["text_empty"].dtype == bool and not s["text_empty"].any()
  # Titles line up with their own pair: recall 'v{i}' sits beside trigger 'w{i}'.
  recall = (batch["recall"]["text_ids"][:, 1] - len(SPECIALS) - N).tolist()
  assert recall == _trigger_index(batch)


def test_restoring_iterator_state_yields_exactly_the_next_batches(built):
  make = lambda: pipeline.make_train_dataset(built["source"], built["tokenizer"], _spec(), 5,
                                             process_index=0, process_count=1)
  it = iter(make())
  for _ in range(7):  # crosses the first epoch boundary (24 / 5)
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
  want = [next(it) for _ in range(3)]
  resumed = iter(make())
  resumed.set_state(state)
  for w in want:
    _assert_same(next(resumed), w)


def test_two_processes_get_disjoint_shares_that_cover_each_epoch(built):
  shares = []
  for p in range(2):
    it = iter(pipeline.make_train_dataset(built["source"], built["tokenizer"], _spec(), 3,
                                          process_index=p, process_count=2))
    shares.append([i for _ in range(N // 6) for i in _trigger_index(next(it))])
  assert len(shares[0]) == len(shares[1]) == N // 2
  assert not set(shares[0]) & set(shares[1])
  assert sorted(shares[0] + shares[1]) == list(range(N))


def test_shuffle_is_fixed_by_seed_and_differs_between_epochs(built):
  def epochs(seed, count=2):
    it = iter(pipeline.make_train_dataset(built["source"], built["tokenizer"],
                                          _spec(shuffle_seed=seed), 4, process_index=0,
                                          process_count=1))
    order = [i for _ in range(count * N // 4) for i in _trigger_index(next(it))]
    return order[:N], order[N:]
  first, second = epochs(0)
  assert sorted(first) == sorted(second) == list(range(N))
  assert first != list(range(N)) and second != first
  assert epochs(0) == (first, second)
  assert epochs(1)[0] != first


def test_augmentation_depends_on_the_example_not_on_the_process_count(built):
  one = next(iter(pipeline.make_train_dataset(built["source"], built["tokenizer"], _spec(), 2,
                                              process_index=0, process_count=1)))
  for p in range(2):
    half = next(iter(pipeline.make_train_dataset(built["source"], built["tokenizer"], _spec(),
                                                 1, process_index=p, process_count=2)))
    assert _trigger_index(half) == [_trigger_index(one)[p]]
    assert np.array_equal(half["trigger"]["image"][0], one["trigger"]["image"][p])


def test_worker_processes_give_the_same_batches_and_resume_exactly(built):
  make = lambda workers: iter(pipeline.make_train_dataset(
      built["source"], built["tokenizer"], _spec(worker_count=workers), 4, process_index=0,
      process_count=1))
  in_process = make(0)
  want = [next(in_process) for _ in range(5)]
  workers = make(2)
  try:
    for w in want[:3]:
      got = next(workers)
      assert type(got["trigger"]["image"]) is np.ndarray  # copied out of shared memory
      _assert_same(got, w)
    state = json.loads(json.dumps(workers.get_state()))
    next(workers)
    workers.set_state(state)  # rewind, as a restored checkpoint would
    for w in want[3:]:
      _assert_same(next(workers), w)
  finally:
    workers.close()


def test_eval_covers_every_pair_once_and_pads_the_last_batch(built):
  spec = _spec(augment=None)
  seen, valid_rows = [], []
  for p in range(2):
    batches = list(pipeline.make_eval_dataset(built["source"], built["tokenizer"], spec, 5,
                                              process_index=p, process_count=2))
    assert len(batches) == 3  # 12 pairs per process -> 5 + 5 + 2 real rows
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 12 + [False] * 3
    ids = np.concatenate([b["trigger_id"] for b in batches])
    assert ids[12:].tolist() == ["", "", ""]
    last = batches[-1]
    assert not last["trigger"]["image"][2:].any() and last["trigger"]["text_empty"][2:].all()
    seen += ids[:12].tolist()
    valid_rows.append(valid.sum())
  assert sorted(seen) == sorted(f"t{i}" for i in range(N))
  # Deterministic, unaugmented: the stored image resized as for eval.
  first = next(iter(pipeline.make_eval_dataset(built["source"], built["tokenizer"], spec, 2,
                                               process_index=0, process_count=1)))
  stored = images.decode_rgb(built["source"][0]["trigger"]["image"])
  assert np.array_equal(first["trigger"]["image"][0], images.fit_square(stored, SIZE, "pad"))


def test_items_loader_embeds_each_listing_once(built):
  items = pipeline.ItemsFromPairs(built["source"], ("recall", "trigger"))
  assert len(items) == 2 * N
  batches = list(pipeline.make_items_dataset(items, built["tokenizer"], _spec(augment=None), 10,
                                             process_index=0, process_count=1))
  assert len(batches) == 5 and set(batches[0]) == {"item", "listing_id", "valid"}
  ids = [i for b in batches for i, v in zip(b["listing_id"], b["valid"]) if v]
  assert sorted(ids) == sorted([f"t{i}" for i in range(N)] + [f"r{i}" for i in range(N)])
  assert batches[0]["item"]["image"].shape == (10, SIZE, SIZE, 3)


def test_catalog_csv_items_skip_and_count_bad_images(built, tmp_path):
  img = built["root"] / "img"
  (tmp_path / "catalog.csv").write_text(
      "listing_id,title,image,cate_lv1_name,cate_name\n"
      "t1,w1,t1.jpg,x,y\nt2,w2,missing.jpg,x,y\nt3,w3,t3.jpg,x,y\n")
  items = pipeline.CatalogItems(tmp_path / "catalog.csv", img, max_bad_fraction=0.5)
  assert len(items) == 2 and items.skips.summary()["by_reason"] == {"missing_image": 1}
  assert items[1]["id"] == "t3" and items[1]["title"] == "w3"
  with pytest.raises(DataError, match=r"catalog\.csv:3: missing_image"):
    pipeline.CatalogItems(tmp_path / "catalog.csv", img, strict=True)


def test_run_config_wiring_and_validation(built):
  from esspr_jax import config as config_lib
  config = config_lib.compose("tiny")
  spec = pipeline.spec_from_config(config)
  assert spec.image_size == config.model.image.size
  assert spec.max_len == config.model.tokenizer.max_len
  assert spec.augment is not None and spec.worker_count == config.data.pipeline.worker_count
  with config.unlocked():
    config.data.pipeline.train_dataset = "train_pairs"
    config.data.pipeline.data_dir = str(built["root"] / "tfds")
  tokenizer = tokenizer_stage.run_tokenizer(config)
  cached = list((built["root"] / "tfds").rglob("tokenizer-*.json"))
  assert len(cached) == 1
  assert tokenizer_stage.run_tokenizer(config).vocab_size == tokenizer.vocab_size
  batch = next(iter(pipeline.train_dataset(config, 4, process_index=0, process_count=1)))
  assert batch["trigger"]["image"].shape == (4, spec.image_size, spec.image_size, 3)
  config.data.pipeline.worker_count = -1
  with pytest.raises(ConfigError, match="data.pipeline.worker_count"):
    config_lib.validate_config(config)


def test_text_only_models_get_batches_without_images(built):
  spec = pipeline.PipelineSpec(image_size=0, max_len=4, with_images=False,
                               augment=images.AugmentParams())
  train = next(iter(pipeline.make_train_dataset(built["source"], built["tokenizer"], spec, 3,
                                                process_index=0, process_count=1)))
  evals = list(pipeline.make_eval_dataset(built["source"], built["tokenizer"], spec, 5,
                                          process_index=0, process_count=1))
  for batch in (train, evals[-1]):
    assert set(batch["trigger"]) == {"text_ids", "text_mask", "text_empty"}
  assert sum(int(b["valid"].sum()) for b in evals) == N


def test_data_readers_load_the_stage_s_tokenizer_and_never_train_one(built):
  from esspr_jax import config as config_lib
  """The tokenizer stage (run_tokenizer) trains a kind-'train' tokenizer; the datasets
  only load it, and say which stage to run when it is missing."""
  config = config_lib.compose("tiny")
  with config.unlocked():
    config.data.pipeline.train_dataset = "train_pairs"
    config.data.pipeline.data_dir = str(built["root"] / "tfds")
    config.model.tokenizer.vocab_size = config.model.tokenizer.vocab_size + 7  # a new cache
  with pytest.raises(DataError, match="the tokenizer stage trains it"):
    pipeline.train_dataset(config, 4, process_index=0, process_count=1)
  with pytest.raises(DataError, match="no tokenizer trained"):
    pipeline.eval_dataset(config, 4, process_index=0, process_count=1)
  assert not list((built["root"] / "tfds").rglob(
      tokenizer_stage.trained_tokenizer_path(config, None).name))
  trained = tokenizer_stage.run_tokenizer(config)
  assert tokenizer_stage.load_tokenizer(config).vocab_size == trained.vocab_size


def test_the_abstract_batch_of_compile_mode_is_the_pipelines(built):
  """--mode=compile compiles for batch_layout.abstract_train_batch without reading data:
  it must have the very keys, shapes and dtypes the pipeline feeds the step."""
  from esspr_jax import batch_layout
  from esspr_jax.config import compose
  config = compose("tiny")
  config.model.image.size, config.model.tokenizer.max_len = SIZE, 4
  real = next(iter(pipeline.make_train_dataset(built["source"], built["tokenizer"], _spec(), 5,
                                               process_index=0, process_count=1,
                                               composed_source=built["source"],
                                               composed_batch_size=3)))
  abstract = batch_layout.abstract_train_batch(config, 5, composed_rows=3)
  flat_real, flat_abstract = _leaves(real), _leaves(abstract)
  assert flat_real.keys() == flat_abstract.keys()
  for key, value in flat_real.items():
    assert (value.shape, value.dtype) == (flat_abstract[key].shape, flat_abstract[key].dtype), key
