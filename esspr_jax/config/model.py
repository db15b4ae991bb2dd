"""Config section `model`: towers, fused head, embedding size, compute dtype, tokenizer.

Keys (see docs/model.md for what each does):
  dtype 'float32'|'bfloat16' (compute; params stay float32), embed_dim, dropout,
  remat, remat_policy (what remat keeps; REMAT_POLICIES), scan, logit_scale_init,
  logit_bias_init,
  image: enabled, kind 'vit'|'clip_vit'|'siglip_vit'|'efficientnet_lite0', size, patch,
         width, depth, heads, mlp_dim, cls_token, mean, std, ln_eps,
         act 'gelu'|'gelu_tanh'|'quick_gelu', batch_norm 'frozen'|'trainable'
         (EfficientNet only), init_from (pretrained checkpoint; models/pretrained.py)
  text: kind 'bert'|'clip'|'siglip', vocab_size, max_positions, type_vocab_size, width,
        depth, heads, mlp_dim, norm 'post'|'pre', ln_eps, act, pooler, init_from
  fused: num_layers, width, heads, mlp_dim, pool 'cls'|'map'|'mean', input_proj,
         output_proj, ln_eps, dual (i / t from per-modality projections of the towers'
         pooled vectors, as CLIP / SigLIP; models/dual_head.py)
  tokenizer: kind 'train'|'vocab_txt'|'file'|'clip'|'siglip', path, vocab_size, max_len,
             lowercase, strip_accents
"""
import json
import math
import pathlib

import ml_collections

from esspr_jax.config.checks import known_keys, one_of, positive_int
from esspr_jax.config.init_from import default_init_from, validate_init_from
from esspr_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16")
POOLS = ("cls", "map", "mean")
NORMS = ("pre", "post")
TOKENIZER_KINDS = ("train", "vocab_txt", "file", "clip", "siglip")
IMAGE_KINDS = ("vit", "clip_vit", "siglip_vit", "efficientnet_lite0")
TEXT_KINDS = ("bert", "clip", "siglip")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
# jax.checkpoint_policies a remat'd block may keep (docs/performance.md measures them).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
BATCH_NORMS = ("frozen", "trainable")
EFFICIENTNET_STRIDE = 32  # the last feature map is size / 32 on a side

# name: (image size, patch, width, depth, heads, mlp) / (width, depth, heads, mlp) / fused
_SIZES = {
    "tiny": dict(image=(32, 8, 32, 1, 2, 64), text=(32, 1, 2, 64), fused=(32, 1, 2, 64),
                 embed_dim=32, vocab=512, positions=32, max_len=16, dtype="float32",
                 remat=False, scan=False),
    # 16 px patches: 16 image tokens per 64 px photo. Colour, silhouette and pattern of
    # the demo products mostly survive, and a step costs about a third of 8 px patches'
    # (64 tokens), keeping the demo job well inside 10 min on 2 cores (docs/results.md).
    "demo": dict(image=(64, 16, 128, 3, 4, 256), text=(128, 3, 4, 256), fused=(128, 1, 4, 256),
                 embed_dim=128, vocab=4096, positions=64, max_len=32, dtype="float32",
                 remat=False, scan=False),
    # ViT-B/16 + BERT-base.
    "base": dict(image=(224, 16, 768, 12, 12, 3072), text=(768, 12, 12, 3072),
                 fused=(768, 2, 12, 3072), embed_dim=512, vocab=30522, positions=512,
                 max_len=64, dtype="bfloat16", remat=True, scan=True),
    # ViT-L/16 + BERT-large.
    "large": dict(image=(224, 16, 1024, 24, 16, 4096), text=(1024, 24, 16, 4096),
                  fused=(1024, 2, 16, 4096), embed_dim=768, vocab=30522, positions=512,
                  max_len=64, dtype="bfloat16", remat=True, scan=True),
}


def default_config(preset: str) -> ml_collections.ConfigDict:
  s = _SIZES[preset]
  c = ml_collections.ConfigDict()
  c.dtype = s["dtype"]
  c.embed_dim = s["embed_dim"]
  c.dropout = 0.0
  c.remat = s["remat"]
  c.remat_policy = "nothing_saveable"  # read while remat is True
  c.scan = s["scan"]
  c.logit_scale_init = math.log(10.0)
  c.logit_bias_init = -10.0

  size, patch, width, depth, heads, mlp = s["image"]
  c.image = ml_collections.ConfigDict(dict(
      enabled=True, kind="vit", size=size, patch=patch, width=width, depth=depth, heads=heads,
      mlp_dim=mlp, cls_token=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), ln_eps=1e-6,
      act="gelu", batch_norm="frozen", init_from=default_init_from("image")))

  width, depth, heads, mlp = s["text"]
  c.text = ml_collections.ConfigDict(dict(
      kind="bert", vocab_size=s["vocab"], max_positions=s["positions"], type_vocab_size=2,
      width=width, depth=depth, heads=heads, mlp_dim=mlp, norm="post", ln_eps=1e-12,
      act="gelu", pooler=False, init_from=default_init_from("text")))

  width, depth, heads, mlp = s["fused"]
  c.fused = ml_collections.ConfigDict(dict(
      num_layers=depth, width=width, heads=heads, mlp_dim=mlp, pool="cls", input_proj=True,
      output_proj=True, ln_eps=1e-6, dual=False))

  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="train", path="", vocab_size=s["vocab"], max_len=s["max_len"], lowercase=True,
      strip_accents=True))
  return c


def _positive_int(cfg, key: str, prefix: str, allow_zero: bool = False) -> int:
  return positive_int(cfg[key], f"{prefix}.{key}", 0 if allow_zero else 1)


def _one_of(cfg, key: str, prefix: str, choices) -> None:
  one_of(cfg[key], f"{prefix}.{key}", choices)


def _heads_divide(cfg, prefix: str) -> None:
  if cfg.width % cfg.heads:
    raise ConfigError(f"{prefix}.heads",
                      f"{prefix}.width={cfg.width} is not divisible by heads={cfg.heads}")


def _file_vocab_size(kind: str, path: str) -> int:
  """Entries in a vocab.txt or tokenizer.json, read without building the tokenizer."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError("model.tokenizer.path", f"{path!r} does not exist")
  try:
    if kind == "vocab_txt":
      with file.open(encoding="utf-8") as f:
        return sum(1 for _ in f)  # ids are line numbers
    spec = json.loads(file.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]  # WordPiece / BPE: {token: id}; Unigram: [[piece, score]]
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids |= {t["id"] for t in spec.get("added_tokens", [])}
    return max(ids) + 1
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError("model.tokenizer.path", f"{path!r} is not a readable {kind} ({e})") from e


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad `model.*` key."""
  if "model" not in config:
    raise ConfigError("model", "missing section")
  m = config.model
  known_keys(m, default_config("tiny"), "model", required=True)
  _one_of(m, "dtype", "model", DTYPES)
  if not isinstance(m.remat, bool):
    raise ConfigError("model.remat", f"must be True or False, got {m.remat!r}")
  _one_of(m, "remat_policy", "model", REMAT_POLICIES)
  _positive_int(m, "embed_dim", "model")
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError("model.dropout", f"must be in [0, 1), got {m.dropout!r}")
  for key in ("logit_scale_init", "logit_bias_init"):
    if not math.isfinite(m[key]):
      raise ConfigError(f"model.{key}", f"must be finite, got {m[key]!r}")

  img = m.image
  if img.enabled:
    _one_of(img, "kind", "model.image", IMAGE_KINDS)
    _one_of(img, "act", "model.image", ACTIVATIONS)
    _one_of(img, "batch_norm", "model.image", BATCH_NORMS)
    for key in ("size", "patch", "width", "heads", "mlp_dim"):
      _positive_int(img, key, "model.image")
    _positive_int(img, "depth", "model.image", allow_zero=True)
    if img.kind == "efficientnet_lite0":
      if img.size % EFFICIENTNET_STRIDE:
        raise ConfigError("model.image.size", f"EfficientNet-Lite0 needs a multiple of "
                          f"{EFFICIENTNET_STRIDE}, got {img.size}")
      if not m.fused.input_proj:
        raise ConfigError("model.fused.input_proj", "EfficientNet-Lite0's 1280-channel "
                          "tokens need the fused head's input projections")
    else:
      if img.size % img.patch:
        raise ConfigError("model.image.patch",
                          f"model.image.size={img.size} is not divisible by patch={img.patch}")
      _heads_divide(img, "model.image")
    if img.kind == "clip_vit" and not img.cls_token:
      raise ConfigError("model.image.cls_token", "kind 'clip_vit' pools its CLS token: set True")
    if img.kind == "siglip_vit" and img.cls_token:
      raise ConfigError("model.image.cls_token", "kind 'siglip_vit' has no CLS token: set False")
    for key in ("mean", "std"):
      values = tuple(img[key])
      if len(values) != 3:
        raise ConfigError(f"model.image.{key}", f"needs 3 values (R, G, B), got {values!r}")
    if any(not v > 0 for v in img.std):
      raise ConfigError("model.image.std", f"must be > 0, got {tuple(img.std)!r}")
    if not img.ln_eps > 0:
      raise ConfigError("model.image.ln_eps", f"must be > 0, got {img.ln_eps!r}")
    validate_init_from(config, "image")

  txt = m.text
  for key in ("vocab_size", "max_positions", "type_vocab_size", "width", "heads", "mlp_dim"):
    _positive_int(txt, key, "model.text")
  _positive_int(txt, "depth", "model.text", allow_zero=True)
  _heads_divide(txt, "model.text")
  _one_of(txt, "norm", "model.text", NORMS)
  _one_of(txt, "kind", "model.text", TEXT_KINDS)
  _one_of(txt, "act", "model.text", ACTIVATIONS)
  if txt.kind != "bert" and txt.norm != "pre":
    raise ConfigError("model.text.norm", f"kind {txt.kind!r} is a pre-LN tower: set 'pre'")
  if not txt.ln_eps > 0:
    raise ConfigError("model.text.ln_eps", f"must be > 0, got {txt.ln_eps!r}")
  validate_init_from(config, "text")

  fu = m.fused
  _positive_int(fu, "num_layers", "model.fused", allow_zero=True)
  for key in ("width", "heads", "mlp_dim"):
    _positive_int(fu, key, "model.fused")
  _one_of(fu, "pool", "model.fused", POOLS)
  if not fu.ln_eps > 0:
    raise ConfigError("model.fused.ln_eps", f"must be > 0, got {fu.ln_eps!r}")
  if fu.num_layers > 0 or fu.pool == "map":
    _heads_divide(fu, "model.fused")
  if fu.pool == "cls" and fu.num_layers == 0:
    raise ConfigError("model.fused.pool", "'cls' needs model.fused.num_layers > 0 (with no "
                      "layers the CLS token never sees the input); use 'mean' or 'map'")
  if not fu.input_proj:
    if fu.width != txt.width:
      raise ConfigError("model.fused.width", f"must equal model.text.width={txt.width} "
                        "when model.fused.input_proj=False")
    if img.enabled and img.width != txt.width:
      raise ConfigError("model.fused.input_proj", f"image width {img.width} != text width "
                        f"{txt.width}: the towers need input projections")
  if not isinstance(fu.dual, bool):
    raise ConfigError("model.fused.dual", f"must be True or False, got {fu.dual!r}")
  if not fu.output_proj and m.embed_dim != fu.width:
    raise ConfigError("model.embed_dim", f"must equal model.fused.width={fu.width} "
                      "when model.fused.output_proj=False")

  tok = m.tokenizer
  _one_of(tok, "kind", "model.tokenizer", TOKENIZER_KINDS)
  if tok.kind != "train" and not tok.path:
    raise ConfigError("model.tokenizer.path", f"kind {tok.kind!r} needs a path")
  if _positive_int(tok, "max_len", "model.tokenizer") < 2:
    raise ConfigError("model.tokenizer.max_len", "must be >= 2 ([CLS] and [SEP])")
  if tok.max_len > txt.max_positions:
    raise ConfigError("model.tokenizer.max_len",
                      f"{tok.max_len} exceeds model.text.max_positions={txt.max_positions}")
  _positive_int(tok, "vocab_size", "model.tokenizer")
  if tok.kind == "train" and tok.vocab_size > txt.vocab_size:
    raise ConfigError("model.tokenizer.vocab_size",
                      f"{tok.vocab_size} exceeds the embedding table model.text.vocab_size="
                      f"{txt.vocab_size}")
  if tok.kind != "train":  # ids past the table would be clamped silently inside jit
    size = _file_vocab_size(tok.kind, tok.path)
    if size > txt.vocab_size:
      raise ConfigError("model.tokenizer.path", f"{tok.path!r} has {size} tokens, more than "
                        f"the embedding table model.text.vocab_size={txt.vocab_size}")
