"""CLIP and SigLIP dual-encoder checkpoints mapped onto both towers, `dual/` and the logits.

Formats (`model.image.init_from.format` and/or `model.text.init_from.format`; point both
towers at the same checkpoint to load all of it):
  hf_clip            Hugging Face CLIPModel: `model.safetensors` (file or its folder)
  hf_siglip          Hugging Face SiglipModel: `model.safetensors`
  big_vision_siglip  big_vision SigLIP `.npz` (`params/img/...`, `params/txt/...`, `t`, `b`)

Each side owns part of the checkpoint and part of our param tree:
  image side: vision_model.* / img/*        -> image/*
              visual_projection / img/head  -> dual/image_out (CLIP has no bias: zeros;
                                               SigLIP has no image projection: identity)
  text side:  text_model.* / txt/*          -> text/*
              text_projection / txt/head    -> dual/text_out (CLIP: bias zeros)
              logit_scale / t               -> logit_scale (both store log of the scale)
              logit_bias / b                -> logit_bias (SigLIP only; CLIP keeps its init)
Tensors of the other side are ignored; anything else in the file, and anything unknown
under a side's own prefixes, is reported by the strict check in models/pretrained.py
(with `allow_unused` patterns on the mapped names, as the per-tower loaders).
The model needs `model.fused.dual=True` for `dual/*` to exist, and the layouts
`model.image.kind='clip_vit'|'siglip_vit'`, `model.text.kind='clip'|'siglip'`.

Layouts (ours in models/layers.py, models/vit.py, models/text.py):
  torch Linear weight [out, in] -> kernel [in, out]; q/k/v -> [D, H, Dh], out -> [H, Dh, D];
  patch conv [D, 3, p, p] -> [p*p*3, D] rows (row, col, channel); nn.MultiheadAttention's
  packed in_proj [3D, D] is split into query / key / value.
"""
from __future__ import annotations

import contextlib
import re
from typing import Mapping

import numpy as np

from esspr_jax.errors import DataError

Flat = dict[str, np.ndarray]
SIDE_PREFIXES = {  # checkpoint prefixes each side reads; the rest belongs to the other side
    ("hf", "image"): ("vision_model.", "visual_projection."),
    ("hf", "text"): ("text_model.", "text_projection.", "logit_scale", "logit_bias"),
    ("big_vision", "image"): ("img/",),
    ("big_vision", "text"): ("txt/", "t", "b"),
}


@contextlib.contextmanager
def naming(name: str):
  """Turns a reshape / split / index that fails on checkpoint tensor `name` (a head count
  that does not divide it, another rank) into a DataError naming it; the loader adds the
  file."""
  try:
    yield
  except DataError:
    raise
  except (ValueError, IndexError) as e:
    raise DataError(f"tensor {name} does not fit the tower's layout ({e})") from e


def _ln(kind: str) -> str:
  return {"weight": "scale", "bias": "bias"}[kind]


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  """torch Linear weight [H*Dh, D] -> [D, H, Dh]; bias [H*Dh] -> [H, Dh]."""
  if w.ndim == 1:
    return w.reshape(heads, -1)
  return w.T.reshape(w.shape[1], heads, -1)


def _attention_out(w: np.ndarray, heads: int) -> np.ndarray:
  """torch Linear weight [D, H*Dh] -> [H, Dh, D] (a bias [D] stays)."""
  return w if w.ndim == 1 else w.T.reshape(heads, -1, w.shape[0])


_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_PARTS = {"layer_norm1": "norm_attn", "layer_norm2": "norm_mlp",
                   "mlp.fc1": "mlp/fc_in", "mlp.fc2": "mlp/fc_out"}


def _hf_block(key: str, value: np.ndarray, heads: int) -> tuple[str, np.ndarray] | None:
  m = _HF_BLOCK.match(key)
  if not m:
    return None
  i, part, kind = m.groups()
  p = f"encoder/layer_{i}/"
  leaf = "kernel" if kind == "weight" else "bias"
  if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
    name = {"q": "query", "k": "key", "v": "value"}[part.split(".")[1][0]]
    return p + f"attn/{name}/{leaf}", _heads_in(value, heads)
  if part == "self_attn.out_proj":
    return p + f"attn/out/{leaf}", _attention_out(value, heads)
  if part in ("layer_norm1", "layer_norm2"):
    return p + f"{_HF_BLOCK_PARTS[part]}/{_ln(kind)}", value
  if part in ("mlp.fc1", "mlp.fc2"):
    return p + f"{_HF_BLOCK_PARTS[part]}/{leaf}", value.T if kind == "weight" else value
  return None


def _identity_projection(width: int) -> Flat:
  return {"dual/image_out/kernel": np.eye(width, dtype=np.float32),
          "dual/image_out/bias": np.zeros((width,), np.float32)}


def hf_image_side(sd: Mapping[str, np.ndarray], heads: int) -> Flat:
  """CLIPModel / SiglipModel vision weights -> `image/...` and `dual/image_out/...`."""
  out: Flat = {}
  for name, value in sd.items():
    with naming(name):
      value = np.asarray(value)
      if name.endswith("position_ids"):
        continue  # a buffer, not a weight
      if name == "visual_projection.weight":  # [E, D], CLIP has no bias
        out["dual/image_out/kernel"] = value.T
        out["dual/image_out/bias"] = np.zeros((value.shape[0],), value.dtype)
        continue
      key = name[len("vision_model."):] if name.startswith("vision_model.") else name
      block = _hf_block(key, value, heads)
      if block:
        out["image/" + block[0]] = block[1]
        continue
      head = re.match(r"head\.(.+)$", key)
      if key == "embeddings.patch_embedding.weight":
        out["image/patch_embed/kernel"] = value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
      elif key == "embeddings.patch_embedding.bias":
        out["image/patch_embed/bias"] = value
      elif key == "embeddings.class_embedding":
        out["image/cls"] = value.reshape(1, 1, -1)
      elif key == "embeddings.position_embedding.weight":
        out["image/pos_embed"] = value
      elif key.startswith("pre_layrnorm."):
        out[f"image/pre_norm/{_ln(key.rsplit('.', 1)[1])}"] = value
      elif key.startswith("post_layernorm."):
        out[f"image/final_norm/{_ln(key.rsplit('.', 1)[1])}"] = value
      elif head:
        out.update(_hf_map_head(head.group(1), value, heads))
      else:
        out["image/" + key.replace(".", "/")] = value
  if "dual/image_out/kernel" not in out and "image/map/probe" in out:
    out.update(_identity_projection(out["image/map/probe"].shape[-1]))  # SigLIP
  return out


def _hf_map_head(key: str, value: np.ndarray, heads: int) -> Flat:
  """SiglipMultiheadAttentionPoolingHead -> `image/map/...` (models/fused.py MapPool)."""
  if key == "probe":
    return {"image/map/probe": value.reshape(1, 1, -1)}
  if key in ("attention.in_proj_weight", "attention.in_proj_bias"):
    leaf = "kernel" if key.endswith("weight") else "bias"
    parts = np.split(value, 3, axis=0)
    return {f"image/map/attn/{n}/{leaf}": _heads_in(w, heads)
            for n, w in zip(("query", "key", "value"), parts)}
  if key.startswith("attention.out_proj."):
    kind = key.rsplit(".", 1)[1]
    return {f"image/map/attn/out/{'kernel' if kind == 'weight' else 'bias'}":
            _attention_out(value, heads)}
  if key.startswith("layernorm."):
    return {f"image/map/norm/{_ln(key.rsplit('.', 1)[1])}": value}
  m = re.match(r"mlp\.fc([12])\.(weight|bias)$", key)
  if m:
    leaf = "kernel" if m.group(2) == "weight" else "bias"
    return {f"image/map/mlp/fc_{'in' if m.group(1) == '1' else 'out'}/{leaf}":
            value.T if leaf == "kernel" else value}
  return {"image/map/" + key.replace(".", "/"): value}


def hf_text_side(sd: Mapping[str, np.ndarray], heads: int) -> Flat:
  """CLIPModel / SiglipModel text weights -> `text/...`, `dual/text_out/...`, logits."""
  out: Flat = {}
  for name, value in sd.items():
    with naming(name):
      value = np.asarray(value)
      if name.endswith("position_ids"):
        continue
      if name in ("logit_scale", "logit_bias"):
        out[name] = value.reshape(())
        continue
      if name == "text_projection.weight":  # [E, Dt], CLIP has no bias
        out["dual/text_out/kernel"] = value.T
        out["dual/text_out/bias"] = np.zeros((value.shape[0],), value.dtype)
        continue
      key = name[len("text_model."):] if name.startswith("text_model.") else name
      block = _hf_block(key, value, heads)
      if block:
        out["text/" + block[0]] = block[1]
      elif key == "embeddings.token_embedding.weight":
        out["text/token_embed/embedding"] = value
      elif key == "embeddings.position_embedding.weight":
        out["text/position_embed/embedding"] = value
      elif key.startswith("final_layer_norm."):
        out[f"text/final_norm/{_ln(key.rsplit('.', 1)[1])}"] = value
      elif key == "head.weight":  # SigLIP's text head [E, Dt] (+ bias)
        out["dual/text_out/kernel"] = value.T
      elif key == "head.bias":
        out["dual/text_out/bias"] = value
      else:
        out["text/" + key.replace(".", "/")] = value
  return out


# ----------------------------------------------------------------------------- big_vision

def _bv_strip(npz: Mapping[str, np.ndarray]) -> Flat:
  raw: Flat = {}
  for name, value in npz.items():
    key = name
    for prefix in ("opt/target/", "params/"):
      if key.startswith(prefix):
        key = key[len(prefix):]
    raw[key] = np.asarray(value)
  return raw


def _bv_unscan(raw: Flat, encoder: str) -> Flat:
  """`<encoder>/encoderblock/x` [depth, ...] -> `<encoder>/encoderblock_{i}/x`."""
  out = {}
  for key, value in raw.items():
    with naming(key):
      if key.startswith(f"{encoder}/encoderblock/"):
        for i in range(value.shape[0]):
          out[key.replace("encoderblock/", f"encoderblock_{i}/")] = value[i]
      else:
        out[key] = value
  return out


_BV_BLOCK = {"LayerNorm_0": "norm_attn", "LayerNorm_1": "norm_mlp",
             "MultiHeadDotProductAttention_0": "attn", "MlpBlock_0": "mlp"}


def _bv_module(rest: str) -> str | None:
  """big_vision block / MAP-head module path -> ours (flax layouts already match)."""
  module, _, tail = rest.partition("/")
  if module not in _BV_BLOCK:
    return None
  tail = tail.replace("Dense_0", "fc_in").replace("Dense_1", "fc_out")
  return f"{_BV_BLOCK[module]}/{tail}"


def big_vision_image_side(npz: Mapping[str, np.ndarray]) -> Flat:
  """big_vision SigLIP `img/...` -> `image/...`, `dual/image_out/...`."""
  raw = _bv_unscan({k[4:]: v for k, v in _bv_strip(npz).items() if k.startswith("img/")},
                   "Transformer")
  out: Flat = {}
  for key, value in raw.items():
    with naming(key):
      block = re.match(r"Transformer/encoderblock_(\d+)/(.+)$", key)
      mapped = _bv_module(block.group(2)) if block else None
      if block and mapped:
        out[f"image/encoder/layer_{block.group(1)}/{mapped}"] = value
      elif key.startswith("MAPHead_0/") and key != "MAPHead_0/probe":
        mapped = _bv_module(key[len("MAPHead_0/"):])
        mapped = mapped.replace("norm_attn/", "norm/") if mapped else None
        out["image/map/" + mapped if mapped else "image/" + key] = value
      elif key == "MAPHead_0/probe":
        out["image/map/probe"] = value.reshape(1, 1, -1)
      elif key == "embedding/kernel":
        out["image/patch_embed/kernel"] = value.reshape(-1, value.shape[-1])
      elif key == "embedding/bias":
        out["image/patch_embed/bias"] = value
      elif key == "pos_embedding":
        out["image/pos_embed"] = value.reshape(-1, value.shape[-1])
      elif key.startswith("Transformer/encoder_norm/"):
        out["image/final_norm/" + key.rsplit("/", 1)[1]] = value
      elif key.startswith("head/"):
        out["dual/image_out/" + key[len("head/"):]] = value
      else:
        out["image/" + key] = value
  if "dual/image_out/kernel" not in out and "image/map/probe" in out:
    out.update(_identity_projection(out["image/map/probe"].shape[-1]))
  return out


def big_vision_text_side(npz: Mapping[str, np.ndarray]) -> Flat:
  """big_vision SigLIP `txt/...`, `t`, `b` -> `text/...`, `dual/text_out/...`, logits."""
  stripped = _bv_strip(npz)
  raw = _bv_unscan({k[4:]: v for k, v in stripped.items() if k.startswith("txt/")},
                   "Encoder_0")
  out: Flat = {}
  for name, target in (("t", "logit_scale"), ("b", "logit_bias")):
    if name in stripped:
      with naming(name):
        out[target] = stripped[name].reshape(())
  for key, value in raw.items():
    with naming(key):
      block = re.match(r"Encoder_0/encoderblock_(\d+)/(.+)$", key)
      mapped = _bv_module(block.group(2)) if block else None
      if block and mapped:
        out[f"text/encoder/layer_{block.group(1)}/{mapped}"] = value
      elif key == "Embed_0/embedding":
        out["text/token_embed/embedding"] = value
      elif key == "pos_embedding":
        out["text/position_embed/embedding"] = value.reshape(-1, value.shape[-1])
      elif key.startswith("Encoder_0/encoder_norm/"):
        out["text/final_norm/" + key.rsplit("/", 1)[1]] = value
      elif key.startswith("head/"):
        out["dual/text_out/" + key[len("head/"):]] = value
      else:
        out["text/" + key] = value
  return out


def split_sides(ckpt: Mapping[str, np.ndarray], family: str, side: str) -> Flat:
  """The checkpoint tensors `side` reads; names under no side's prefix stay (as strays)."""
  mine = SIDE_PREFIXES[(family, side)]
  other = SIDE_PREFIXES[(family, "text" if side == "image" else "image")]

  def owned(name: str, prefixes) -> bool:
    stripped = name
    for p in ("opt/target/", "params/"):
      stripped = stripped[len(p):] if stripped.startswith(p) else stripped
    return any(stripped == p or (p.endswith((".", "/")) and stripped.startswith(p))
               for p in prefixes)

  return {k: v for k, v in ckpt.items() if owned(k, mine) or not owned(k, other)}


def convert_side(ckpt: Mapping[str, np.ndarray], fmt: str, side: str, heads: int) -> Flat:
  """One side of a dual checkpoint as full param paths (`image/...`, `dual/...`, ...)."""
  family = "big_vision" if fmt == "big_vision_siglip" else "hf"
  part = split_sides(ckpt, family, side)
  if family == "hf":
    return hf_image_side(part, heads) if side == "image" else hf_text_side(part, heads)
  converted = big_vision_image_side(part) if side == "image" else big_vision_text_side(part)
  strays = {k: np.asarray(v) for k, v in _bv_strip(part).items()
            if not k.startswith(("img/", "txt/")) and k not in ("t", "b")}
  converted.update(strays)  # keys the file has under no known prefix: reported as unused
  return converted
