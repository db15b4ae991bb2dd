"""train(train_source=...): a caller's own pairs (the text recipe's) batched by the
project's pipeline, so hard negatives are mined from them and attached; text only."""
import json

import jax
import numpy as np
import pytest

from esspr_jax import stages, train
from esspr_jax.config import compose
from esspr_jax.config.loss import text_only_infonce
from esspr_jax.hard_negatives import feed
from esspr_jax.hard_negatives.catalog import TrainingCatalog

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAIRS = 12


def _source():
  """Pairs a{i} -> b{i}, in two sets; the first six in set 'x', the rest in 'y'."""
  return [{"trigger": {"id": f"a{i}", "title": f"w{i} red"},
           "recall": {"id": f"b{i}", "title": f"v{i} red"},
           "cate_name": "x/" if i < PAIRS // 2 else "y/"} for i in range(PAIRS)]


def _config(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(SPECIALS + ["red"] + [f"w{i}" for i in range(PAIRS)]
                             + [f"v{i}" for i in range(PAIRS)]) + "\n")
  config = compose("tiny")
  m = config.model
  m.image.enabled = False
  m.tokenizer.update(kind="vocab_txt", path=str(vocab), max_len=6)
  text_only_infonce(config.loss)
  t = config.train
  t.steps, t.batch_size, t.log_every = 3, 4, 1
  t.schedule.warmup_steps = 1
  t.checkpoint.async_save = False
  t.eval_at_end = False
  t.hard_negatives.update(enabled=True, every_steps=2, per_trigger=2, max_cost_fraction=0.0)
  config.data.pipeline.augment.enabled = False
  config.data.pipeline.worker_count = 0
  return config


def test_train_source_mines_within_its_categories(tmp_path):
  config = _config(tmp_path)
  source = _source()
  result = train.train(config, tmp_path / "run", train_source=source,
                       hooks=stages.training_hooks(config, tmp_path / "run",
                                                   train_source=source),
                       devices=jax.devices()[:1])
  assert result.step == 3
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
          .splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "hard_negatives"] == [0, 2]
  assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
  catalog = TrainingCatalog(source)
  versions = feed.load_versions(tmp_path / "run" / "hard_negatives", 3, pairs=PAIRS,
                                listings=len(catalog), per_trigger=2)
  assert len(versions) == 2
  for version in versions:
    assert version.table.shape == (PAIRS, 2)
    for i, negatives in enumerate(version.table):
      trigger = catalog.trigger_row[i]
      assert (catalog.category[negatives] == catalog.category[trigger]).all()
      assert catalog.recall_row[i] not in negatives and trigger not in negatives


def test_train_source_and_train_dataset_together_are_refused(tmp_path):
  with pytest.raises(ValueError, match="train_dataset or train_source"):
    train.train(_config(tmp_path), tmp_path / "run", train_source=_source(),
                train_dataset=iter([]))
