"""Shared, session-scoped fixtures for the retrieval tests: one tiny model compiled once.

The model is randomly initialised (jitted init: eager init is slow); every test that
embeds uses batch size 4 and all three modalities, so the embed function compiles once.
"""
import dataclasses

import flax.linen as nn
import jax
import pytest

from esspr_jax.config import compose, validate_config
from esspr_jax.ingest import release_format
from esspr_jax.input import pipeline
from esspr_jax.models import build_model, example_side
from esspr_jax.models.tokenizer import Tokenizer


@dataclasses.dataclass
class Tiny:
  config: object
  model: object
  params: object
  tokenizer: object
  spec: object
  source: list        # the esspr_sample pairs with image bytes

  def eval_batches(self, pairs=None):
    return pipeline.make_eval_dataset(self.source if pairs is None else pairs, self.tokenizer,
                                      self.spec, self.config.eval.batch_size,
                                      process_index=0, process_count=1)


def sample_source(sample_dir):
  rows = list(release_format.read_pairs(sample_dir / "same_trigger_recall_pairs_information"))
  side = lambda i, t, img: {"id": i, "title": t, "image": (sample_dir / img).read_bytes()}
  return [{"trigger": side(r.trigger_id, r.trigger_title, r.trigger_img),
           "recall": side(r.recall_id, r.recall_title, r.recall_img)} for r in rows]


@pytest.fixture(scope="session")
def tiny(shared_data):
  config = compose("tiny")
  config.unlock()
  config.eval.settings = "all"
  config.eval.batch_size = 4          # 10 pairs -> a padded last batch
  config.eval.export.chunk_rows = 8
  config.lock()
  validate_config(config)
  source = sample_source(shared_data / "esspr_sample")
  titles = [s[k]["title"] for s in source for k in ("trigger", "recall")]
  tokenizer = Tokenizer.train(titles * 3, config.model.tokenizer.vocab_size)
  model = build_model(config.model)
  init = jax.jit(lambda key: nn.unbox(model.init(key, example_side(config.model, 1))["params"]))
  params = init(jax.random.key(0))
  return Tiny(config, model, params, tokenizer, pipeline.spec_from_config(config), source)
