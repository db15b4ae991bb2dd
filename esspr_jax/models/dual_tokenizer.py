"""Tokenizers of CLIP and SigLIP checkpoints, from their `tokenizer.json`.

Both give the same rows as `models.tokenizer.Tokenizer` (`text_ids`, `text_mask`,
`text_empty`), laid out the way each checkpoint was trained:

  CLIP (byte-level BPE; the file's normaliser lower-cases):
      <|startoftext|> pieces... <|endoftext|> <pad>...   mask 1 from BOS to EOS
      pieces cut at max_len - 2; the text tower pools the EOS (the last masked position).
  SigLIP (SentencePiece unigram):
      pieces... </s> <pad>...   text canonicalised first as big_vision / Hugging Face do
      (lower-cased, ASCII punctuation removed, whitespace runs collapsed, stripped);
      pieces cut at max_len - 1; padding is </s> by default; the tower attends to every
      position and pools the last one, so max_len must be the checkpoint's (64).

The ids equal `transformers`' fast tokenizer on the same file (tests/models/
test_pretrained_dual.py). SigLIP checkpoints ship `spiece.model`, not a `tokenizer.json`:
docs/pretrained.md gives the one-time conversion command.
"""
from __future__ import annotations

import pathlib
import re
import string
from typing import Sequence

import numpy as np
import tokenizers

from esspr_jax.errors import ConfigError
from esspr_jax.models.titles import title_text

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def siglip_canonical(text: str, lowercase: bool = True) -> str:
  """big_vision's text canonicalisation (Hugging Face SiglipTokenizer.canonicalize_text)."""
  if lowercase:
    text = text.lower()
  return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()


class _CheckpointTokenizer:
  """Shared machinery: a `tokenizers.Tokenizer` plus the checkpoint's special ids."""
  kind = ""

  def __init__(self, backend: tokenizers.Tokenizer, *, eos: str, pad: str, bos: str = "",
               lowercase: bool = True, where: str = "tokenizer"):
    self.backend = backend
    backend.no_truncation()
    backend.no_padding()
    self.lowercase = lowercase

    def token_id(token: str) -> int:
      index = backend.token_to_id(token)
      if index is None:
        raise ValueError(f"{where}: the {self.kind} vocabulary lacks {token!r}")
      return index

    self.bos_id = token_id(bos) if bos else None
    self.eos_id = token_id(eos)
    self.pad_id = token_id(pad)

  @classmethod
  def load(cls, path, **kwargs):
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    return cls(tokenizers.Tokenizer.from_file(str(path)), where=str(path), **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def _prepare(self, text: str) -> str:
    return text

  def encode_batch(self, titles: Sequence, max_len: int) -> dict:
    """int32[B, max_len] ids and mask, bool[B] empty flags (see module doc)."""
    specials = 1 + int(self.bos_id is not None)
    if max_len < specials:
      raise ConfigError("model.tokenizer.max_len", f"must be >= {specials}, got {max_len}")
    texts = [self._prepare(title_text(t)) for t in titles]
    encodings = self.backend.encode_batch(texts, add_special_tokens=False)
    ids = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=np.int32)
    empty = np.zeros((len(texts),), dtype=bool)
    for row, encoding in enumerate(encodings):
      pieces = encoding.ids[:max_len - specials]
      head = [] if self.bos_id is None else [self.bos_id]
      real = head + list(pieces) + [self.eos_id]
      ids[row, :len(real)] = real
      mask[row, :len(real)] = 1
      empty[row] = not pieces
    return {"text_ids": ids, "text_mask": mask, "text_empty": empty}

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


class ClipTokenizer(_CheckpointTokenizer):
  """OpenAI CLIP's BPE (Hugging Face CLIPTokenizer's tokenizer.json)."""
  kind = "clip"

  def __init__(self, backend, *, bos="<|startoftext|>", eos="<|endoftext|>",
               pad="<|endoftext|>", lowercase: bool = True, where: str = "tokenizer"):
    super().__init__(backend, bos=bos, eos=eos, pad=pad, lowercase=lowercase, where=where)


class SiglipTokenizer(_CheckpointTokenizer):
  """SigLIP's SentencePiece model as a tokenizer.json, with big_vision's canonicalisation."""
  kind = "siglip"

  def __init__(self, backend, *, eos="</s>", pad="</s>", lowercase: bool = True,
               where: str = "tokenizer"):
    super().__init__(backend, eos=eos, pad=pad, lowercase=lowercase, where=where)

  def _prepare(self, text: str) -> str:
    return siglip_canonical(text, self.lowercase)


DUAL_TOKENIZERS = {"clip": ClipTokenizer, "siglip": SiglipTokenizer}


def dual_tokenizer_from_config(tokenizer_config):
  """`model.tokenizer` with kind 'clip' or 'siglip' -> the tokenizer of its `path`."""
  if not tokenizer_config.path:
    raise ConfigError("model.tokenizer.path", f"kind {tokenizer_config.kind!r} needs a path")
  cls = DUAL_TOKENIZERS[tokenizer_config.kind]
  return cls.load(tokenizer_config.path, lowercase=bool(tokenizer_config.lowercase))
