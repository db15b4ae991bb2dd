"""WordPiece tokenisation of product titles into fixed-length id rows.

Wraps a `tokenizers.Tokenizer` (Rust, fast) with BERT's normalisation
(clean text, CJK splitting, optional lower-casing and accent stripping) and
BERT's single-sequence layout `[CLS] tokens... [SEP] [PAD]...`.

Three ways to get one: `Tokenizer.train` on a corpus of titles,
`Tokenizer.from_vocab_txt` for a BERT-family `vocab.txt` (gives the same ids as
the Hugging Face uncased BERT tokenizer), `Tokenizer.load` for a `tokenizer.json`
written by `save` (or by Hugging Face).

Empty titles: an empty, whitespace-only or missing (`None`, NaN) title, or one
whose characters all normalise away, encodes as `[CLS] [SEP]` followed by
padding, with `text_mask` 1 on those two positions and `text_empty=True`. This is
exactly what BERT itself produces for "", so a pretrained text tower sees a
well-formed input, and no row ever has an all-zero mask because of its title.
"""
from __future__ import annotations

import collections
import pathlib
from typing import Iterable, Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from esspr_jax.atomic_io import atomic_write
from esspr_jax.errors import ConfigError
from esspr_jax.models.dual_tokenizer import dual_tokenizer_from_config
from esspr_jax.models.titles import title_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # trained vocabularies put them at ids 0..4


def _bert_pipeline(backend: tokenizers.Tokenizer, lowercase: bool, strip_accents: bool) -> None:
  """Installs BERT's normaliser, pre-tokeniser, decoder and [CLS]/[SEP] template."""
  backend.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True,
      strip_accents=strip_accents, lowercase=lowercase)
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  backend.decoder = decoders.WordPiece(prefix="##")
  backend.post_processor = processors.TemplateProcessing(
      single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
      special_tokens=[(CLS, backend.token_to_id(CLS)), (SEP, backend.token_to_id(SEP))])


class Tokenizer:
  """Titles -> `{'text_ids', 'text_mask', 'text_empty'}` NumPy rows (see module doc)."""

  def __init__(self, backend: tokenizers.Tokenizer):
    missing = [t for t in (PAD, UNK, CLS, SEP) if backend.token_to_id(t) is None]
    if missing:
      raise ValueError(f"tokenizer vocabulary lacks the special tokens {missing}")
    self.backend = backend
    backend.no_truncation()
    backend.no_padding()
    self.pad_id = backend.token_to_id(PAD)
    self.unk_id = backend.token_to_id(UNK)
    self.cls_id = backend.token_to_id(CLS)
    self.sep_id = backend.token_to_id(SEP)

  # ---- construction ----
  @classmethod
  def train(cls, titles: Iterable, vocab_size: int, lowercase: bool = True,
            strip_accents: bool = True, min_frequency: int = 2) -> "Tokenizer":
    """Learns a WordPiece vocabulary of at most `vocab_size` entries from titles.

    Deterministic: the same titles give the same vocabulary and ids in every run
    (Hugging Face's WordPieceTrainer breaks count ties in hash order, so a fresh run
    would not repeat). See `_wordpiece_vocab` for the selection rule.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
      raise ConfigError("model.tokenizer.vocab_size",
                        f"must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True,
        strip_accents=strip_accents, lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: collections.Counter = collections.Counter()
    for title in map(title_text, titles):
      if title.strip():
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(title))
        word_counts.update(word for word, _ in words)
    vocab = _wordpiece_vocab(word_counts, vocab_size, min_frequency)
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(
        {token: i for i, token in enumerate(vocab)}, unk_token=UNK))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    _bert_pipeline(backend, lowercase, strip_accents)
    return cls(backend)

  @classmethod
  def from_vocab_txt(cls, path, lowercase: bool = True, strip_accents: bool = True) -> "Tokenizer":
    """A BERT-family `vocab.txt` (one token per line, line number = id)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"vocab.txt not found: {path}")
    vocab = {}
    with path.open(encoding="utf-8") as f:
      for index, line in enumerate(f):
        token = line.rstrip("\n").rstrip("\r")
        vocab.setdefault(token, index)  # BERT keeps the first id of a duplicate line
    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token=UNK))
    backend.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
    try:
      _bert_pipeline(backend, lowercase, strip_accents)
    except Exception as e:  # noqa: BLE001 - a vocab without [CLS]/[SEP] is the usual cause
      raise ValueError(f"{path}: not a BERT vocabulary ({e})") from e
    return cls(backend)

  @classmethod
  def load(cls, path) -> "Tokenizer":
    """A `tokenizer.json` written by `save` (or any Hugging Face BERT tokenizer.json)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    return cls(tokenizers.Tokenizer.from_file(str(path)))

  def save(self, path) -> None:
    """Writes `tokenizer.json` atomically (temp file + rename)."""
    atomic_write(path, self.backend.to_str(pretty=False))

  # ---- use ----
  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, titles: Sequence, max_len: int) -> dict:
    """Encodes titles into `int32[B,max_len]` ids and mask plus `bool[B]` empty flags.

    Titles longer than `max_len - 2` word pieces are truncated; `[SEP]` always ends
    the real tokens. Never raises on a title's content (see module doc).
    """
    if max_len < 2:
      raise ConfigError("model.tokenizer.max_len",
                        f"must be >= 2 for [CLS] and [SEP], got {max_len}")
    texts = [title_text(t) for t in titles]
    encodings = self.backend.encode_batch(texts, add_special_tokens=False)
    ids = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=np.int32)
    empty = np.zeros((len(texts),), dtype=bool)
    for row, encoding in enumerate(encodings):
      pieces = encoding.ids[:max_len - 2]
      length = len(pieces) + 2
      ids[row, 0] = self.cls_id
      ids[row, 1:length - 1] = pieces
      ids[row, length - 1] = self.sep_id
      mask[row, :length] = 1
      empty[row] = not pieces
    return {"text_ids": ids, "text_mask": mask, "text_empty": empty}

  def decode(self, ids: Sequence[int]) -> str:
    """Text of an id row, specials and padding dropped (for debugging and search UIs)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_from_config(tokenizer_config, titles: Optional[Iterable] = None) -> Tokenizer:
  """Builds the tokenizer `config.model.tokenizer` describes.

  kind 'train' learns one from `titles`; 'vocab_txt' reads a BERT vocab.txt at
  `path`; 'file' loads a tokenizer.json at `path`; 'clip' / 'siglip' load a CLIP /
  SigLIP checkpoint's tokenizer.json (models/dual_tokenizer.py).
  """
  kind = tokenizer_config.kind
  if kind == "train":
    if titles is None:
      raise ConfigError("model.tokenizer.kind", "'train' needs the training titles")
    return Tokenizer.train(titles, tokenizer_config.vocab_size, tokenizer_config.lowercase,
                           tokenizer_config.strip_accents)
  if not tokenizer_config.path:
    raise ConfigError("model.tokenizer.path", f"kind {kind!r} needs a path")
  if kind == "vocab_txt":
    return Tokenizer.from_vocab_txt(tokenizer_config.path, tokenizer_config.lowercase,
                                    tokenizer_config.strip_accents)
  if kind == "file":
    return Tokenizer.load(tokenizer_config.path)
  if kind in ("clip", "siglip"):  # a CLIP / SigLIP checkpoint's tokenizer.json
    return dual_tokenizer_from_config(tokenizer_config)
  raise ConfigError("model.tokenizer.kind",
                    f"unknown kind {kind!r}; use 'train', 'vocab_txt', 'file', 'clip' or 'siglip'")


_MAX_CONTINUATION = 8  # longest '##' piece considered, in characters


def _wordpiece_vocab(word_counts: dict, vocab_size: int, min_frequency: int) -> list:
  """Specials, then characters (word-initial and '##' continuation) by frequency,
  then word-initial prefixes and '##' continuations scored by the frequency of the
  words containing them (ties: longer first, then alphabetical). Every word stays
  encodable (characters are always in), frequent words become single tokens, and
  the order is a pure function of the counts."""
  chars: collections.Counter = collections.Counter()
  pieces: collections.Counter = collections.Counter()
  for word, n in word_counts.items():
    for c in word:
      chars[c] += n
    if n < min_frequency:
      continue
    for j in range(2, len(word) + 1):
      pieces[word[:j]] += n
    for i in range(1, len(word)):
      for j in range(i + 2, min(len(word), i + _MAX_CONTINUATION) + 1):
        pieces["##" + word[i:j]] += n
  by_score = lambda kv: (-kv[1], -len(kv[0]), kv[0])  # noqa: E731
  vocab = list(SPECIAL_TOKENS)
  for c, _ in sorted(chars.items(), key=by_score):
    if len(vocab) + 2 > vocab_size:
      break
    vocab += [c, "##" + c]
  for piece, _ in sorted(pieces.items(), key=by_score):
    if len(vocab) >= vocab_size:
      break
    vocab.append(piece)
  return vocab
