"""CLIP / SigLIP checkpoints into both towers: parity with transformers, layouts, strictness.

No download: small random-weight CLIPModel / SiglipModel objects are built with
`transformers` (a test-only dependency), saved as safetensors (and as a big_vision
`.npz`), loaded into esspr-jax, and the image and text embeddings compared.
"""
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from esspr_jax.config import compose, validate_config
from esspr_jax.errors import ConfigError
from esspr_jax.models import pretrained
from esspr_jax.models.dual_tokenizer import ClipTokenizer, SiglipTokenizer, siglip_canonical
from esspr_jax.models.model import build_model, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

D, HEADS, MLP, LAYERS, SIZE, PATCH, VOCAB, LENGTH = 32, 2, 64, 2, 32, 8, 99, 16
EOS = VOCAB - 1


def _randomise(model, seed):
  """Every weight random (HF inits LayerNorms to 1/0 and biases to 0: too easy a test)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _hf_clip(tmp_path_factory):
  cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, intermediate_size=MLP,
                       max_position_embeddings=LENGTH + 4, eos_token_id=EOS, bos_token_id=EOS - 1,
                       pad_token_id=0),
      vision_config=dict(hidden_size=D, image_size=SIZE, patch_size=PATCH,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=MLP),
      projection_dim=24)
  model = _randomise(transformers.CLIPModel(cfg), 0)
  folder = tmp_path_factory.mktemp("clip")
  model.save_pretrained(folder)
  return model, folder


def _hf_siglip(tmp_path_factory):
  cfg = transformers.SiglipConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, intermediate_size=MLP,
                       max_position_embeddings=LENGTH),
      vision_config=dict(hidden_size=D, image_size=SIZE, patch_size=PATCH,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         intermediate_size=MLP))
  model = _randomise(transformers.SiglipModel(cfg), 1)
  folder = tmp_path_factory.mktemp("siglip")
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return _hf_clip(tmp_path_factory)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  return _hf_siglip(tmp_path_factory)


MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _config(family, path, fmt, scan=False, embed_dim=24):
  cfg = compose("tiny")
  with cfg.unlocked():
    m = cfg.model
    m.scan = scan
    m.embed_dim = embed_dim
    m.image.update(kind=f"{family}_vit", size=SIZE, patch=PATCH, width=D, depth=LAYERS,
                   heads=HEADS, mlp_dim=MLP, cls_token=family == "clip", mean=MEAN, std=STD,
                   ln_eps=1e-5 if family == "clip" else 1e-6,
                   act="quick_gelu" if family == "clip" else "gelu_tanh")
    m.text.update(kind=family, vocab_size=VOCAB, max_positions=LENGTH + 4 if family == "clip"
                  else LENGTH, width=D, depth=LAYERS, heads=HEADS, mlp_dim=MLP, norm="pre",
                  ln_eps=m.image.ln_eps, act=m.image.act)
    m.tokenizer.update(max_len=LENGTH, vocab_size=VOCAB)
    m.fused.dual = True
    for tower in ("image", "text"):
      m[tower].init_from.path, m[tower].init_from.format = str(path), fmt
  validate_config(cfg)
  return cfg


def _images(n=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _pixels(images):
  x = (images.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _clip_ids(seed=0):
  """BOS pieces EOS pad... rows of varied length, as the CLIP tokenizer lays them out."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((3, LENGTH), np.int32)
  mask = np.zeros((3, LENGTH), np.int32)
  for row, length in enumerate((LENGTH, 5, 2)):
    ids[row, :length] = rng.integers(1, EOS - 1, length)
    ids[row, 0], ids[row, length - 1] = EOS - 1, EOS
    mask[row, :length] = 1
  return ids, mask


def _init(model):
  """Fresh params, initialised under jit (eager init costs minutes on a loaded machine)."""
  return jax.jit(lambda key: init_params(model, key))(jax.random.key(0))


def _abstract(model):
  """Param shapes only: enough for the strict checks, which fail before any copy."""
  return jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0))


def _ours(cfg, images, ids, mask, modalities=("i", "t")):
  model = build_model(cfg.model)
  params = pretrained.apply_init_from(_init(model), cfg.model)
  side = {"image": images, "text_ids": ids, "text_mask": mask}
  out = jax.jit(lambda p, s: model.apply({"params": p}, s, modalities=modalities))(params, side)
  return {k: np.asarray(v) for k, v in out.items()}, params


def _unit(x):
  x = x.detach().numpy() if hasattr(x, "detach") else x
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _assert_same_embeddings(ours, theirs):
  theirs = _unit(theirs)
  assert np.max(np.abs(ours - theirs)) <= 1e-4
  assert np.all(np.sum(ours * theirs, axis=-1) >= 0.9999)


def test_hf_clip_reproduces_image_and_text_embeddings(clip):
  model, folder = clip
  images, (ids, mask) = _images(), _clip_ids()
  ours, params = _ours(_config("clip", folder, "hf_clip"), images, ids, mask, ("i", "t", "m"))
  with torch.no_grad():
    img = model.get_image_features(pixel_values=_pixels(images)).pooler_output
    txt = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                  attention_mask=torch.from_numpy(mask).long()).pooler_output
  _assert_same_embeddings(ours["i"], img)
  _assert_same_embeddings(ours["t"], txt)
  assert float(params["logit_scale"].unbox()) == pytest.approx(
      float(model.logit_scale.detach()), abs=1e-6)
  # m at step 0: the gate is closed, so m is the normalised sum of the two views.
  np.testing.assert_allclose(ours["m"], _unit(ours["i"] + ours["t"]), atol=1e-6)


def _siglip_ids(seed=1):
  """pieces EOS EOS... (SigLIP pads with its EOS and attends to every position)."""
  rng = np.random.default_rng(seed)
  ids = np.full((3, LENGTH), 1, np.int32)
  mask = np.zeros((3, LENGTH), np.int32)
  for row, length in enumerate((LENGTH, 6, 1)):
    ids[row, :length - 1] = rng.integers(2, VOCAB, length - 1)
    mask[row, :length] = 1
  return ids, mask


def _siglip_reference(model, images, ids):
  with torch.no_grad():
    img = model.get_image_features(pixel_values=_pixels(images)).pooler_output
    txt = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
  return img, txt


def test_hf_siglip_reproduces_image_and_text_embeddings(siglip):
  model, folder = siglip
  images, (ids, mask) = _images(seed=2), _siglip_ids()
  ours, params = _ours(_config("siglip", folder, "hf_siglip", embed_dim=D), images, ids, mask)
  img, txt = _siglip_reference(model, images, ids)
  _assert_same_embeddings(ours["i"], img)
  _assert_same_embeddings(ours["t"], txt)
  assert float(params["logit_scale"].unbox()) == pytest.approx(float(model.logit_scale.detach()), abs=1e-6)
  assert float(params["logit_bias"].unbox()) == pytest.approx(float(model.logit_bias.detach()), abs=1e-6)


def _flax_attention(sd, prefix, heads, packed=False):
  """torch attention weights -> flax MultiHeadDotProductAttention params (big_vision)."""
  if packed:
    ws = np.split(sd[prefix + "in_proj_weight"], 3)
    bs = np.split(sd[prefix + "in_proj_bias"], 3)
    out_w, out_b = sd[prefix + "out_proj.weight"], sd[prefix + "out_proj.bias"]
  else:
    ws = [sd[prefix + f"{n}_proj.weight"] for n in "qkv"]
    bs = [sd[prefix + f"{n}_proj.bias"] for n in "qkv"]
    out_w, out_b = sd[prefix + "out_proj.weight"], sd[prefix + "out_proj.bias"]
  width = out_w.shape[0]
  tree = {}
  for name, w, b in zip(("query", "key", "value"), ws, bs):
    tree[f"{name}/kernel"] = w.T.reshape(width, heads, -1)
    tree[f"{name}/bias"] = b.reshape(heads, -1)
  tree["out/kernel"] = out_w.T.reshape(heads, -1, width)
  tree["out/bias"] = out_b
  return tree


def _flax_block(sd, p, heads):
  tree = {f"MultiHeadDotProductAttention_0/{k}": v
          for k, v in _flax_attention(sd, p + "self_attn.", heads).items()}
  for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
    tree[f"{ours}/scale"], tree[f"{ours}/bias"] = sd[p + theirs + ".weight"], sd[p + theirs + ".bias"]
  for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    tree[f"MlpBlock_0/{ours}/kernel"] = sd[p + f"mlp.{theirs}.weight"].T
    tree[f"MlpBlock_0/{ours}/bias"] = sd[p + f"mlp.{theirs}.bias"]
  return tree


def _to_big_vision(model):
  """A SiglipModel's weights in big_vision's layout: image blocks scanned, text per block."""
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  out = {}
  v = "vision_model."
  out["params/img/embedding/kernel"] = sd[v + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
  out["params/img/embedding/bias"] = sd[v + "embeddings.patch_embedding.bias"]
  out["params/img/pos_embedding"] = sd[v + "embeddings.position_embedding.weight"][None]
  blocks = [_flax_block(sd, f"{v}encoder.layers.{i}.", HEADS) for i in range(LAYERS)]
  for k in blocks[0]:
    out[f"params/img/Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
  out["params/img/Transformer/encoder_norm/scale"] = sd[v + "post_layernorm.weight"]
  out["params/img/Transformer/encoder_norm/bias"] = sd[v + "post_layernorm.bias"]
  h = v + "head."
  out["params/img/MAPHead_0/probe"] = sd[h + "probe"]
  for k, val in _flax_attention(sd, h + "attention.", HEADS, packed=True).items():
    out[f"params/img/MAPHead_0/MultiHeadDotProductAttention_0/{k}"] = val
  out["params/img/MAPHead_0/LayerNorm_0/scale"] = sd[h + "layernorm.weight"]
  out["params/img/MAPHead_0/LayerNorm_0/bias"] = sd[h + "layernorm.bias"]
  for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    out[f"params/img/MAPHead_0/MlpBlock_0/{ours}/kernel"] = sd[h + f"mlp.{theirs}.weight"].T
    out[f"params/img/MAPHead_0/MlpBlock_0/{ours}/bias"] = sd[h + f"mlp.{theirs}.bias"]
  t = "text_model."
  out["params/txt/Embed_0/embedding"] = sd[t + "embeddings.token_embedding.weight"]
  out["params/txt/pos_embedding"] = sd[t + "embeddings.position_embedding.weight"][None]
  for i in range(LAYERS):
    for k, val in _flax_block(sd, f"{t}encoder.layers.{i}.", HEADS).items():
      out[f"params/txt/Encoder_0/encoderblock_{i}/{k}"] = val
  out["params/txt/Encoder_0/encoder_norm/scale"] = sd[t + "final_layer_norm.weight"]
  out["params/txt/Encoder_0/encoder_norm/bias"] = sd[t + "final_layer_norm.bias"]
  out["params/txt/head/kernel"] = sd[t + "head.weight"].T
  out["params/txt/head/bias"] = sd[t + "head.bias"]
  out["params/t"], out["params/b"] = sd["logit_scale"], sd["logit_bias"]
  return out


def test_big_vision_siglip_npz_reproduces_the_same_embeddings(siglip, tmp_path):
  model, _ = siglip
  path = tmp_path / "siglip.npz"
  np.savez(path, **_to_big_vision(model))
  images, (ids, mask) = _images(seed=3), _siglip_ids(seed=4)
  ours, params = _ours(_config("siglip", path, "big_vision_siglip", embed_dim=D, scan=True),
                       images, ids, mask)
  img, txt = _siglip_reference(model, images, ids)
  _assert_same_embeddings(ours["i"], img)
  _assert_same_embeddings(ours["t"], txt)
  assert float(params["logit_bias"].unbox()) == pytest.approx(float(model.logit_bias.detach()), abs=1e-6)


def test_dual_checkpoints_are_loaded_strictly(clip, siglip, tmp_path):
  from safetensors.numpy import load_file, save_file
  _, folder = clip
  sd = load_file(str(folder / "model.safetensors"))
  # A stray tensor, and a missing one, are both named.
  bad = dict(sd, **{"vision_model.extra.weight": np.zeros(3, np.float32)})
  del bad["text_model.final_layer_norm.bias"]
  save_file(bad, str(tmp_path / "model.safetensors"))
  cfg = _config("clip", tmp_path, "hf_clip")
  params = _abstract(build_model(cfg.model))
  with pytest.raises(ConfigError, match="text/final_norm/bias"):
    pretrained.apply_init_from(params, cfg.model)
  with cfg.unlocked():
    cfg.model.text.init_from.path = ""
  with pytest.raises(ConfigError, match="image/extra/weight"):
    pretrained.apply_init_from(params, cfg.model)
  # A model without the dual head has no place for the projections.
  cfg = _config("clip", folder, "hf_clip")
  with cfg.unlocked():
    cfg.model.fused.dual = False
  params = _abstract(build_model(cfg.model))
  with pytest.raises(ConfigError, match="dual/text_out/kernel"):
    pretrained.apply_init_from(params, cfg.model)
  # The wrong family's layout is refused too (SigLIP weights into CLIP-shaped towers).
  cfg = _config("clip", siglip[1], "hf_siglip")
  with cfg.unlocked():
    cfg.model.text.init_from.path = ""
  params = _abstract(build_model(cfg.model))
  with pytest.raises(ConfigError, match=r"missing .*image/cls.*no place .*image/map/attn"):
    pretrained.apply_init_from(params, cfg.model)


# ----------------------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def real_titles(shared_data):
  from esspr_jax.recipes import product_matching
  titles = list(product_matching.load_amazon_google(shared_data).heldout.gallery.values())
  return titles[:200]


def test_clip_tokenizer_matches_transformers(real_titles, tmp_path):
  from tokenizers import Tokenizer, models, trainers
  reference = transformers.CLIPTokenizer()  # CLIP's pipeline, empty vocabulary
  backend = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
  backend.normalizer = reference.backend_tokenizer.normalizer
  backend.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
  from tokenizers import pre_tokenizers
  trainer = trainers.BpeTrainer(vocab_size=600, end_of_word_suffix="</w>",
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<|startoftext|>", "<|endoftext|>"])
  backend.train_from_iterator(real_titles, trainer)
  spec = __import__("json").loads(backend.to_str())
  hf = transformers.CLIPTokenizer(vocab=spec["model"]["vocab"],
                                  merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                          for m in spec["model"]["merges"]])
  hf.save_pretrained(tmp_path)
  ours = ClipTokenizer.load(tmp_path / "tokenizer.json")
  rows = ours.encode_batch(real_titles, LENGTH)
  theirs = hf(real_titles, padding="max_length", truncation=True, max_length=LENGTH)
  np.testing.assert_array_equal(rows["text_ids"], np.asarray(theirs["input_ids"]))
  np.testing.assert_array_equal(rows["text_mask"], np.asarray(theirs["attention_mask"]))
  assert (rows["text_ids"][:, 0] == hf.bos_token_id).all()
  assert not rows["text_empty"].any()


@pytest.fixture()
def hf_siglip_canonical(monkeypatch):
  """Hugging Face's own SigLIP canonicalisation (its module imports sentencepiece, which
  only its SentencePiece model needs; canonicalize_text is plain Python)."""
  monkeypatch.setitem(sys.modules, "sentencepiece", types.ModuleType("sentencepiece"))
  monkeypatch.delitem(sys.modules, "transformers.models.siglip.tokenization_siglip",
                      raising=False)
  from transformers.models.siglip.tokenization_siglip import SiglipTokenizer as HF
  owner = types.SimpleNamespace(do_lower_case=True,
                                remove_punctuation=lambda t: HF.remove_punctuation(None, t))
  return lambda text: HF.canonicalize_text(owner, text)


def test_siglip_tokenizer_matches_transformers(real_titles, hf_siglip_canonical, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
  assert [siglip_canonical(t) for t in real_titles] == [hf_siglip_canonical(t)
                                                        for t in real_titles]
  backend = Tokenizer(models.Unigram())
  backend.pre_tokenizer = pre_tokenizers.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"],
                                    unk_token="<unk>")
  backend.train_from_iterator([siglip_canonical(t) for t in real_titles], trainer)
  backend.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))])
  path = tmp_path / "tokenizer.json"
  backend.save(str(path))
  ours = SiglipTokenizer.load(path)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="</s>",
                                            pad_token="</s>", unk_token="<unk>")
  canonical = [hf_siglip_canonical(t) for t in real_titles]
  rows = ours.encode_batch(real_titles, 64)
  theirs = hf(canonical, padding="max_length", truncation=True, max_length=64)
  np.testing.assert_array_equal(rows["text_ids"], np.asarray(theirs["input_ids"]))
  np.testing.assert_array_equal(rows["text_mask"], np.asarray(theirs["attention_mask"]))
  short = ours.encode_batch(real_titles, 8)["text_ids"]
  assert (short[:, -1] == ours.eos_id).all()  # cut pieces, never the EOS


@pytest.mark.parametrize("name", ["clip_b16", "siglip_b16"])
def test_b16_configs_validate_and_name_their_files(name, tmp_path):
  import importlib.util
  import json
  import pathlib
  spec = importlib.util.spec_from_file_location(
      name, pathlib.Path(__file__).resolve().parents[2] / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(ConfigError, match="init_from.path"):  # not downloaded: a clear error
    validate_config(module.get_config(str(tmp_path / "absent")))
  (tmp_path / "model.safetensors").write_bytes(b"")
  vocab = {f"piece{i}": i for i in range(1000)}
  (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
  cfg = module.get_config(str(tmp_path))
  validate_config(cfg)
  m = cfg.model
  assert m.fused.dual and m.tokenizer.path == str(tmp_path / "tokenizer.json")
  assert m.image.init_from.path == m.text.init_from.path == str(tmp_path)
  shapes = nn.unbox(_abstract(build_model(m)))
  assert shapes["dual"]["image_out"]["kernel"].shape == (768, m.embed_dim)
