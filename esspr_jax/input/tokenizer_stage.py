"""The tokenizer stage: a kind-'train' tokenizer is learnt once on the train dataset's
titles and cached next to that dataset (named by its settings), so training, eval,
export and search all load the same one; other kinds are built from their files."""
from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Iterator, Sequence

from esspr_jax.errors import DataError
from esspr_jax.input import esspr_tfds
from esspr_jax.models import tokenizer as tokenizer_lib


def iter_titles(source: Sequence) -> Iterator[str]:
  """Both sides' titles of every pair, in order (to train a tokenizer)."""
  for i in range(len(source)):
    example = source[i]
    for side in ("trigger", "recall"):
      title = example[side]["title"]
      yield title.decode("utf-8") if isinstance(title, bytes) else str(title)


def trained_tokenizer_path(config, data_dir) -> pathlib.Path:
  """Where a kind-'train' tokenizer lives: next to the train dataset, named by its
  settings (so a changed vocab size is a different file)."""
  tok = config.model.tokenizer
  path = esspr_tfds.dataset_path(esspr_tfds.data_dir_from_config(config, data_dir),
                                 config.data.pipeline.train_dataset)
  settings = json.dumps({"vocab_size": tok.vocab_size, "lowercase": tok.lowercase,
                         "strip_accents": tok.strip_accents}, sort_keys=True)
  return path / f"tokenizer-{hashlib.sha256(settings.encode()).hexdigest()[:12]}.json"


def load_tokenizer(config, data_dir=None):
  """The run's tokenizer for those who read data (train, eval, export): a kind-'train'
  one must have been trained by the tokenizer stage (`run_tokenizer`); other kinds are
  built from their files by models/tokenizer.py's `tokenizer_from_config`."""
  tok = config.model.tokenizer
  if tok.kind != "train":
    return tokenizer_lib.tokenizer_from_config(tok)
  cache = trained_tokenizer_path(config, data_dir)
  if not cache.is_file():
    raise DataError(f"{cache}: no tokenizer trained on dataset "
                    f"{config.data.pipeline.train_dataset!r} with these settings; the "
                    "tokenizer stage trains it (esspr-jax --mode=all, or --mode=train, "
                    "which runs it first)")
  return tokenizer_lib.Tokenizer.load(cache)


def run_tokenizer(config, data_dir=None):
  """The tokenizer stage: kind 'train' learns one on the train
  dataset's titles once and caches it next to that dataset, so training, eval and
  export load the same one (`load_tokenizer`); other kinds are built from their files."""
  tok = config.model.tokenizer
  if tok.kind != "train" or trained_tokenizer_path(config, data_dir).is_file():
    return load_tokenizer(config, data_dir)
  cache = trained_tokenizer_path(config, data_dir)
  source = esspr_tfds.open_pairs_source(cache.parent)
  tokenizer = tokenizer_lib.Tokenizer.train(iter_titles(source), tok.vocab_size, tok.lowercase,
                                            tok.strip_accents)
  tokenizer.save(cache)
  return tokenizer
