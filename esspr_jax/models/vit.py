"""ViT image tower: uint8 images -> patch-token states (and a pooled vector).

Param tree (a contract with models/pretrained.py; keep it stable). S = image size,
p = patch, N = (S/p)^2 patches, N' = N + 1 with a CLS token else N, D = width,
H = heads, Dh = D / H, F = mlp_dim. Logical axis names in brackets.

  patch_embed/kernel         [p*p*3, D]  (patch_in, embed)   conv kernel [p,p,3,D] reshaped,
                                                              rows ordered (row, col, channel)
  patch_embed/bias           [D]         (embed)
  cls                        [1, 1, D]   (-, -, embed)        only with cls_token=True
  pos_embed                  [N', D]     (pos, embed)         position 0 is the CLS token's
  encoder/layer_{i}/ ...     pre-LN blocks, layout in models/encoder.py
  final_norm/{scale,bias}    [D]         (embed)

Mapping from the usual checkpoints (done in models/pretrained.py):
  google-research ViT / AugReg (Flax): embedding/kernel [p,p,3,D] -> reshape;
    Transformer/posembed_input/pos_embedding [1,N',D] -> [N',D]; encoderblock_i/
    LayerNorm_0 -> norm_attn, MultiHeadDotProductAttention_1 -> attn (same [D,H,Dh]
    layout), LayerNorm_2 -> norm_mlp, MlpBlock_3/Dense_0|1 -> mlp/fc_in|fc_out;
    encoder_norm -> final_norm.
  big_vision: the same, except its pos_embedding covers only the N patches (the CLS
    token there has no position): prepend a zero row.
  timm: patch_embed.proj.weight [D,3,p,p] -> transpose (2,3,1,0) then reshape;
    pos_embed [1,N',D]; blocks.i.attn.qkv [3D, D] -> split into query/key/value.
With scan=True the blocks live under `encoder/layers/` with a leading [depth] axis.

`kind` (config `model.image.kind`) picks the layout of a dual encoder's image tower:
  'vit'         as above; pooled = CLS token (or the token mean without one).
  'clip_vit'    OpenAI CLIP / HF CLIPVisionModel: patch_embed has no bias, a LayerNorm
                `pre_norm/{scale,bias}` follows the position embedding, pooled = the CLS
                token after final_norm (HF post_layernorm); needs cls_token=True.
  'siglip_vit'  SigLIP / HF SiglipVisionModel: no CLS token, pooled by a MAP head
                `map/{probe [1,1,D], attn/..., norm/..., mlp/...}` (models/fused.py MapPool)
                over the final_norm'ed tokens; needs cls_token=False.
`act` is the MLP activation ('gelu' exact, 'gelu_tanh' SigLIP, 'quick_gelu' OpenAI CLIP).

Images are normalised inside the model: x = (pixel / 255 - mean) / std per channel;
mean = std = 0.5 maps to [-1, 1] (the AugReg / big_vision convention).
"""
from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from esspr_jax.models.encoder import Encoder, remat_setting
from esspr_jax.models.fused import MapPool
from esspr_jax.models.layers import compute_dtype, constrain, dense, layer_norm, normal_init

VIT_KINDS = ("vit", "clip_vit", "siglip_vit")


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B,H,W,C] -> [B, (H/p)*(W/p), p*p*C], patches row-major, pixels (row, col, channel)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class VisionTower(nn.Module):
  """uint8 images [B,S,S,3] -> (tokens [B,N',D], pooled [B,D])."""
  image_size: int
  patch: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  cls_token: bool = True
  mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
  ln_eps: float = 1e-6
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: bool | str = False  # Encoder.remat
  scan: bool = False
  kind: str = "vit"
  act: str = "gelu"

  @classmethod
  def from_config(cls, model_config, name: str = "image") -> "VisionTower":
    v = model_config.image
    return cls(image_size=v.size, patch=v.patch, width=v.width, depth=v.depth, heads=v.heads,
               mlp_dim=v.mlp_dim, cls_token=v.cls_token, mean=tuple(v.mean), std=tuple(v.std),
               ln_eps=v.ln_eps, kind=v.kind, act=v.act, dropout=model_config.dropout,
               dtype=compute_dtype(model_config.dtype), remat=remat_setting(model_config),
               scan=model_config.scan, name=name)

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch) ** 2 + int(self.cls_token)

  def normalize(self, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images have shape {images.shape[1:]}, the model expects "
                       f"({self.image_size}, {self.image_size}, 3) (model.image.size)")
    if self.kind not in VIT_KINDS:
      raise ValueError(f"kind must be one of {VIT_KINDS}, got {self.kind!r}")
    x = patchify(self.normalize(images), self.patch).astype(self.dtype)
    x = dense(self.width, ("patch_in", "embed"), self.dtype, "patch_embed",
              use_bias=self.kind != "clip_vit")(x)
    if self.cls_token:
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (None, None, "embed")),
                       (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype), x],
                          axis=1)
    pos = self.param("pos_embed", normal_init(("pos", "embed")), (self.num_tokens, self.width),
                     jnp.float32)
    x = (x + pos[None].astype(x.dtype))
    if self.kind == "clip_vit":
      x = layer_norm(self.ln_eps, self.dtype, "pre_norm")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = constrain(x, ("batch", "seq", "act_embed"))
    x = Encoder(self.depth, self.heads, self.mlp_dim, norm="pre", ln_eps=self.ln_eps,
                dropout=self.dropout, dtype=self.dtype, remat=self.remat, scan=self.scan,
                act=self.act, name="encoder")(x, None, train)
    x = layer_norm(self.ln_eps, self.dtype, "final_norm")(x)
    if self.kind == "siglip_vit":
      pooled = MapPool(self.heads, self.mlp_dim, self.ln_eps, self.dtype, self.act,
                       name="map")(x, None)
    else:
      pooled = x[:, 0] if self.cls_token else jnp.mean(x, axis=1)
    return x, pooled
