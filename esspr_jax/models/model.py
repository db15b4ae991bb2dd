"""EssprModel: one side of a batch -> its {'i', 't', 'm'} embeddings in one space.

    model = build_model(config.model)
    params = model.init(rng, side)['params']
    emb = model.apply({'params': params}, side, modalities=('t', 'm'))

Top-level param tree:
  image/       VisionTower (models/vit.py), or EfficientNetLite0 (models/efficientnet.py)
               with image.kind='efficientnet_lite0'; absent with image.enabled=False
  text/        TextTower (models/text.py)
  fused/       FusedHead (models/fused.py), shared by the three branches
  dual/        DualViews (models/dual_head.py), only with fused.dual=True: i and t come
               from the towers' pooled vectors (CLIP / SigLIP style), m adds the gated
               fused head
  logit_scale  scalar, init log(10): temperature of InfoNCE / sigmoid losses
  logit_bias   scalar, init -10: bias of the sigmoid loss

Each tower runs once per call and only if a requested modality needs it
(`modalities=('t',)` never touches the image tower). Unavailable modalities
(`i`, `m` of a text-only model) are left out of the result.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from esspr_jax.config.constants import MODALITIES
from esspr_jax.errors import DataError
from esspr_jax.models.dual_head import DualViews
from esspr_jax.models.efficientnet import EfficientNetLite0
from esspr_jax.models.fused import FusedHead
from esspr_jax.models.text import TextTower
from esspr_jax.models.vit import VisionTower



def image_tower(model_config) -> nn.Module:
  """The image tower `model.image.kind` names: a ViT layout or EfficientNet-Lite0."""
  if model_config.image.kind == "efficientnet_lite0":
    return EfficientNetLite0.from_config(model_config)
  return VisionTower.from_config(model_config)


def _scalar(value: float):
  return nn.with_logical_partitioning(nn.initializers.constant(value), ())


class EssprModel(nn.Module):
  """See module doc. `config` is `config.model` (frozen)."""
  config: ml_collections.FrozenConfigDict

  @property
  def available(self) -> tuple:
    return MODALITIES if self.config.image.enabled else ("t",)

  def _check_side(self, side, need_image: bool, need_text: bool) -> None:
    keys = (["image"] if need_image else []) + (["text_ids", "text_mask"] if need_text else [])
    missing = [k for k in keys if k not in side]
    if missing:
      raise DataError(f"model input lacks {missing}; it has {sorted(side)}")
    if need_image and side["image"].dtype != jnp.uint8:
      raise DataError("'image' must be uint8 RGB (the model normalises it), "
                      f"got {side['image'].dtype}")
    if need_text and side["text_ids"].shape != side["text_mask"].shape:
      raise DataError(f"'text_ids' {side['text_ids'].shape} and 'text_mask' "
                      f"{side['text_mask'].shape} differ in shape")

  @nn.compact
  def __call__(self, side, train: bool = False, modalities: Sequence[str] = MODALITIES):
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
      raise ValueError(f"unknown modalities {unknown}; choose from {MODALITIES}")
    wanted = self.available if self.is_initializing() else tuple(
        m for m in MODALITIES if m in modalities and m in self.available)
    if not wanted:
      raise ValueError(f"none of {tuple(modalities)} is available; this model has {self.available}")
    need_image = "i" in wanted or "m" in wanted
    need_text = "t" in wanted or "m" in wanted
    self._check_side(side, need_image, need_text)

    image_tokens = text_tokens = text_mask = image_pooled = text_pooled = None
    if need_image:
      image_tokens, image_pooled = image_tower(self.config)(side["image"], train)
    if need_text:
      text_mask = side["text_mask"]
      text_tokens, text_pooled = TextTower.from_config(self.config)(
          side["text_ids"], text_mask, train)
    head = FusedHead.from_config(self.config)
    out = {}
    if self.config.fused.dual:
      fused = head(image_tokens, text_tokens, text_mask, train) if "m" in wanted else None
      views = DualViews.from_config(self.config)(
          image_pooled if "i" in wanted or "m" in wanted else None,
          text_pooled if "t" in wanted or "m" in wanted else None, fused)
      out = {m: views[m] for m in wanted}
    if "i" in wanted and "i" not in out:
      out["i"] = head(image_tokens, None, None, train)
    if "t" in wanted and "t" not in out:
      out["t"] = head(None, text_tokens, text_mask, train)
    if "m" in wanted and "m" not in out:
      out["m"] = head(image_tokens, text_tokens, text_mask, train)
    self.param("logit_scale", _scalar(self.config.logit_scale_init), (), jnp.float32)
    self.param("logit_bias", _scalar(self.config.logit_bias_init), (), jnp.float32)
    return out


def build_model(model_config: ml_collections.ConfigDict) -> EssprModel:
  """The model `config.model` describes (validate the run config first)."""
  return EssprModel(ml_collections.FrozenConfigDict(model_config))


def example_side(model_config, batch_size: int = 2) -> dict:
  """A zero-filled batch side of the right shapes and dtypes (for init / eval_shape)."""
  size, length = model_config.image.size, model_config.tokenizer.max_len
  mask = np.zeros((batch_size, length), np.int32)
  mask[:, :2] = 1  # [CLS] [SEP], as the tokenizer writes an empty title
  return {
      "image": np.zeros((batch_size, size, size, 3), np.uint8),
      "text_ids": np.zeros((batch_size, length), np.int32),
      "text_mask": mask,
      "text_empty": np.ones((batch_size,), bool),
  }


def init_params(model: EssprModel, rng: jax.Array, batch_size: int = 2):
  """Initial params (boxed with logical axis metadata, as flax returns them)."""
  return model.init(rng, example_side(model.config, batch_size))["params"]


def count_params(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) param tree."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(params))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))
