"""Model FLOPs of one training step, counted from the config (what MFU divides by).

XLA's own count of the step (its cost analysis) is the program's, not
the model's: it includes remat's recomputed forward passes and the optimizer's
elementwise updates, and it counts a scan's body once, so a scanned layer stack
(`model.scan`) or gradient caching's micro-batches (`train.grad_accum_steps`) shrink
it. MFU should follow the model, not how the step runs it, so this module counts
the work the model itself needs, analytically:

  * every matmul, 2*M*N*K: the towers' projections and MLPs (the ViT's patch
    embedding included), the attention scores and weighted values (2*L*L*D each),
    the fused head (input projections, its layers over the concatenated tokens, its
    pooling, its output projection), the dual head's projections, and the loss's
    similarity matmuls (query rows x gallery rows x embed_dim x 2 per scored pair);
  * EfficientNet-Lite0's convolutions, 2*K*K*Cin*Cout*Hout*Wout (depthwise
    2*K*K*C*Hout*Wout);
  * forward x 3 for forward + backward (x 1 for what only the composed term's
    constant reference views need); no remat recomputation, and
    `train.grad_accum_steps` does not change the count.

Elementwise work (norms, activations, softmax, the optimizer) and embedding lookups
are left out: a few percent of a step whose matmuls dominate. The count follows the
code (models/model.py): each tower runs once per side when any requested modality
needs it, at every position (titles are padded to `tokenizer.max_len`), and the fused
head runs once per requested modality. A tower's pooled vector (SigLIP's MAP head, the
BERT pooler) counts only with `fused.dual`: nothing else reads it, and XLA drops it.
The loss is counted as `losses.loss_unit` computes it for `config.loss`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from esspr_jax.config.constants import MODALITIES
from esspr_jax.config.loss_plan import plan_terms
from esspr_jax.config.model import EFFICIENTNET_STRIDE
from esspr_jax.losses.extra_gallery import EXTENDED_KINDS, HARD_SIDE
from esspr_jax.models.efficientnet import HEAD_WIDTH, STEM_WIDTH, block_specs

# Forward + backward: the backward pass forms two products per forward matmul (the
# gradients of its two operands).
TRAIN_FACTOR = 3


def matmul_flops(m: int, n: int, k: int) -> float:
  """An [m, k] x [k, n] product."""
  return 2.0 * m * n * k


def attention_flops(q_len: int, kv_len: int, width: int) -> float:
  """Multi-head attention (models/layers.py Attention): query and output projections
  over the queries, key and value projections over the keys, scores and values."""
  projections = 2 * matmul_flops(q_len, width, width) + 2 * matmul_flops(kv_len, width, width)
  return projections + 2 * matmul_flops(q_len, kv_len, width)


def mlp_flops(length: int, width: int, mlp_dim: int) -> float:
  return 2 * matmul_flops(length, mlp_dim, width)


def block_flops(length: int, width: int, mlp_dim: int) -> float:
  """One encoder block (models/encoder.py) over `length` tokens (causal or masked
  attention still computes every score)."""
  return attention_flops(length, length, width) + mlp_flops(length, width, mlp_dim)


def map_pool_flops(length: int, width: int, mlp_dim: int) -> float:
  """MapPool (models/fused.py): one probe attends over `length` tokens, then its MLP."""
  return attention_flops(1, length, width) + mlp_flops(1, width, mlp_dim)


def efficientnet_flops(size: int) -> float:
  """EfficientNet-Lite0's convolutions on one size x size photo ("SAME" padding)."""
  side = math.ceil(size / 2)  # stem 3x3/2
  total = matmul_flops(side * side, STEM_WIDTH, 3 * 3 * 3)
  for kernel, stride, expand, width_in, width_out in block_specs():
    hidden = width_in * expand
    if expand != 1:
      total += matmul_flops(side * side, hidden, width_in)
    side = math.ceil(side / stride)
    total += 2.0 * kernel * kernel * hidden * side * side  # depthwise
    total += matmul_flops(side * side, width_out, hidden)
  return total + matmul_flops(side * side, HEAD_WIDTH, block_specs()[-1][-1])


def image_tokens(model_config) -> tuple[int, int]:
  """(token count, width) of the image tower's output."""
  image = model_config.image
  if image.kind == "efficientnet_lite0":
    return (image.size // EFFICIENTNET_STRIDE) ** 2, HEAD_WIDTH
  return (image.size // image.patch) ** 2 + int(image.cls_token), image.width


def image_tower_flops(model_config) -> float:
  """One photo through the image tower (models/vit.py or models/efficientnet.py); its
  pooled vector (SigLIP's MAP head) counts only where the dual head reads it."""
  image = model_config.image
  if image.kind == "efficientnet_lite0":
    return efficientnet_flops(image.size)
  length, width = image_tokens(model_config)
  patches = (image.size // image.patch) ** 2
  total = matmul_flops(patches, width, image.patch * image.patch * 3)
  total += image.depth * block_flops(length, width, image.mlp_dim)
  if image.kind == "siglip_vit" and model_config.fused.dual:
    total += map_pool_flops(length, width, image.mlp_dim)
  return total


def text_tower_flops(model_config) -> float:
  """One title through the text tower (models/text.py), at all max_len positions; its
  pooler counts only where the dual head reads the pooled vector."""
  text, length = model_config.text, model_config.tokenizer.max_len
  total = text.depth * block_flops(length, text.width, text.mlp_dim)
  if text.pooler and model_config.fused.dual:
    total += matmul_flops(1, text.width, text.width)
  return total


def fused_head_flops(model_config, image: bool, text: bool) -> float:
  """One call of the fused head (models/fused.py) on image and/or text tokens."""
  fused = model_config.fused
  length, total = int(fused.pool == "cls"), 0.0
  for present, (tokens, width) in ((image, image_tokens(model_config)),
                                   (text, (model_config.tokenizer.max_len,
                                           model_config.text.width))):
    if present:
      length += tokens
      if fused.input_proj:
        total += matmul_flops(tokens, fused.width, width)
  total += fused.num_layers * block_flops(length, fused.width, fused.mlp_dim)
  if fused.pool == "map":
    total += map_pool_flops(length, fused.width, fused.mlp_dim)
  if fused.output_proj:
    total += matmul_flops(1, model_config.embed_dim, fused.width)
  return total


def forward_flops_per_example(model_config, modalities: Sequence[str]) -> float:
  """One example's forward FLOPs when the model embeds it in `modalities`
  (models/model.py EssprModel: the modalities it lacks are dropped, as there)."""
  available = MODALITIES if model_config.image.enabled else ("t",)
  wanted = [m for m in MODALITIES if m in modalities and m in available]
  if not wanted:
    raise ValueError(f"none of {tuple(modalities)} is available; this model has {available}")
  need_image = "i" in wanted or "m" in wanted
  need_text = "t" in wanted or "m" in wanted
  total = image_tower_flops(model_config) if need_image else 0.0
  total += text_tower_flops(model_config) if need_text else 0.0
  if model_config.fused.dual:  # i, t: projections of the pooled vectors; m adds the head
    embed = model_config.embed_dim
    total += matmul_flops(1, embed, image_tokens(model_config)[1]) if need_image else 0.0
    total += matmul_flops(1, embed, model_config.text.width) if need_text else 0.0
    return total + (fused_head_flops(model_config, True, True) if "m" in wanted else 0.0)
  calls = {"i": (True, False), "t": (False, True), "m": (True, True)}
  return total + sum(fused_head_flops(model_config, *calls[m]) for m in wanted)


def side_rows(config, side: str) -> int:
  """Rows of the global batch a side holds."""
  train = config.train
  if side in ("trigger", "recall"):
    return train.batch_size
  if side.startswith("composed_"):
    return train.composed_batch_size
  if side == HARD_SIDE:
    return train.batch_size * train.hard_negatives.per_trigger
  raise ValueError(f"unknown side {side!r}: expected trigger, recall, composed_trigger, "
                   f"composed_recall or {HARD_SIDE}")


def loss_forward_flops(config, views: Mapping[str, Sequence[str]]) -> float:
  """The similarity matmuls of `losses.loss_unit` for the global batch.

  Each (query view, gallery) pair is scored once however many terms read it
  (losses/chunking.py run_block_terms); with a 'hard_negative' side the hinge,
  InfoNCE and sigmoid terms against a recall view score an extended gallery of
  batch + mined rows (losses/extra_gallery.py). The composed term scores its queries
  against the targets and against the references."""
  plan = plan_terms(config.loss)
  embed, rows = config.model.embed_dim, side_rows(config, "trigger")
  hard_rows = side_rows(config, HARD_SIDE) if HARD_SIDE in views else 0
  scored = set()
  for term in plan.terms:
    extended = hard_rows and term.kind in EXTENDED_KINDS and term.gallery[0] == "recall"
    columns = rows + hard_rows if extended else rows
    queries = (term.query,) + ((term.anchor,) if term.anchor else ())
    scored.update((query, term.gallery, columns) for query in queries)
  total = sum(matmul_flops(rows, columns, embed) for _, _, columns in scored)
  if plan.composed:
    composed = config.train.composed_batch_size
    total += 2 * matmul_flops(composed, composed, embed)
  return total


def constant_views(config) -> set:
  """(side, modality) views the loss reads only as constants (the composed term's
  reference photos, under stop_gradient): no gradient flows back through them."""
  composed = plan_terms(config.loss).composed
  return {composed.anchor} if composed else set()


def _side_flops(model_config, modalities: Sequence[str], constants: Sequence[str]) -> float:
  """Forward + backward of one example; the part only `constants` need runs forward only."""
  full = forward_flops_per_example(model_config, modalities)
  trained = [m for m in modalities if m not in constants]
  trained_flops = forward_flops_per_example(model_config, trained) if trained else 0.0
  return TRAIN_FACTOR * trained_flops + (full - trained_flops)


def model_flops_per_step(config, views: Mapping[str, Sequence[str]]) -> float:
  """Model FLOPs of one training step on the global batch (forward + backward).

  config: the run config; views: {side: modalities} the step embeds (the loss plan's
  `plan_terms(config.loss).views()`, plus 'hard_negative' when it is mined)."""
  constants = constant_views(config)
  total = TRAIN_FACTOR * loss_forward_flops(config, views)
  for side, modalities in views.items():
    side_constants = [m for s, m in constants if s == side]
    total += side_rows(config, side) * _side_flops(config.model, modalities, side_constants)
  return float(total)
