"""Model FLOPs of a train step (esspr_jax/model_flops.py): against XLA's count of the real
step where that count is a model count, and against a count done by hand."""
import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import model_batches  # noqa: E402

from esspr_jax import optim, sharding, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402
from esspr_jax.config.loss import text_only_infonce  # noqa: E402
from esspr_jax.config.loss_plan import plan_terms  # noqa: E402
from esspr_jax.model_flops import (  # noqa: E402
    forward_flops_per_example, loss_forward_flops, model_flops_per_step)
from esspr_jax.train_step import TrainState, train_step  # noqa: E402

ROWS = 32


def _mid_config():
  """Wide enough that matmuls dominate: elementwise work is a few percent of XLA's count."""
  config = compose("tiny")
  for tower in ("image", "text"):
    config.model[tower].update(width=256, mlp_dim=1024, depth=2, heads=4)
  config.model.fused.update(width=256, mlp_dim=1024, num_layers=2, heads=4)
  config.model.image.update(size=64, patch=16)
  config.model.tokenizer.max_len = 32
  config.model.embed_dim = 256
  config.model.remat = False
  config.train.batch_size = ROWS
  config.train.grad_accum_steps = 1
  return config


def _text_only(config):
  config.model.image.enabled = False
  text_only_infonce(config.loss)


def _dual(config):
  config.model.fused.dual = True


def _efficientnet(config):
  config.model.image.kind = "efficientnet_lite0"


def _varied(config):
  """SigLIP-style image tower (MAP pooling), CLIP-style text with a pooler, a MAP fused
  head, InfoNCE / sigmoid pairs, the composed term and mined hard negatives."""
  config.model.image.update(kind="siglip_vit", cls_token=False, act="gelu_tanh")
  config.model.text.update(kind="clip", norm="pre", pooler=True)
  config.model.fused.pool = "map"
  config.loss.pairs.m_m.kind = "infonce"
  config.loss.pairs.t_m.kind = "sigmoid"
  config.loss.pairs.t_t.update(kind="infonce", weight=1.0)
  config.loss.composed.weight = 0.1
  config.train.composed_batch_size = 16
  config.train.hard_negatives.update(enabled=True, per_trigger=2)


def _varied_dual(config):
  """The above as a dual encoder: the towers' pooled vectors (MAP head, pooler) count."""
  _varied(config)
  config.model.fused.dual = True


def _batch_and_views(config):
  """A real-shaped global batch and the views the trainer embeds for it."""
  tc = config.train
  composed = tc.composed_batch_size if config.loss.composed.weight > 0 else 0
  batch = model_batches.make_batch(config.model, 0, ROWS, composed)
  views = plan_terms(config.loss).views()
  if tc.hard_negatives.enabled:  # the miner's side (hard_negatives/miner.py)
    batch["hard_negative"] = model_batches.random_side(
        config.model, np.random.default_rng(1), ROWS * tc.hard_negatives.per_trigger)
    views = dict(views) | {"hard_negative": tuple(views["recall"])}
  return batch, views


def _xla_flops(config, views, batch) -> float:
  """XLA's count of the real train step on one device, lowered as train.set_up lowers it
  (the same number set_up reports as flops_per_step), without compiling."""
  model, loss_fn, _ = train.default_model_and_loss(config)
  side = jax.tree_util.tree_map(lambda x: x[:1], batch["trigger"])
  boxed = jax.eval_shape(model.init, jax.random.key(0), side)["params"]
  params = nn.unbox(boxed)
  tx, schedule = optim.make_optimizer(config.train, params, sharding.logical_specs(boxed))
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     opt_state=jax.eval_shape(tx.init, params))
  step = functools.partial(train_step, model=model, loss_fn=loss_fn, views=views, tx=tx,
                           schedule=schedule, base_rng=jax.random.key(1),
                           logical_rules=sharding.rules(config.train),
                           micro_steps=config.train.grad_accum_steps)
  with jax.set_mesh(sharding.make_mesh(config.train, jax.devices()[:1])):
    return float(jax.jit(step).lower(state, batch).cost_analysis()["flops"])


def _counts(config) -> tuple[float, float]:
  """(model count, XLA's count) of one step of `config`."""
  batch, views = _batch_and_views(config)
  return model_flops_per_step(config, views), _xla_flops(config, views, batch)


@pytest.fixture(scope="module")
def default_counts():
  return _counts(_mid_config())


@pytest.mark.parametrize("variant", [None, _text_only, _dual, _efficientnet, _varied,
                                     _varied_dual],
                         ids=["default", "text_only", "dual", "efficientnet", "varied",
                              "varied_dual"])
def test_model_count_agrees_with_xla_without_remat_or_accumulation(variant, default_counts):
  config = _mid_config()
  if variant:
    variant(config)
  model, xla = _counts(config) if variant else default_counts
  ratio = model / xla
  # XLA also counts elementwise work and the gradients the step never forms (the
  # photo's pixels): the model count is a little under or over, never far.
  assert ratio == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("change", [{"grad_accum_steps": 2}, {"remat": True}, {"scan": True}],
                         ids=["grad_accum", "remat", "scan"])
def test_model_count_ignores_how_the_step_is_run_while_xla_count_moves(change, default_counts):
  config = _mid_config()
  for key, value in change.items():
    (config.train if key in config.train else config.model)[key] = value
  before, after = default_counts, _counts(config)
  assert after[0] == before[0]
  # Gradient caching adds a forward pass but XLA counts its scan bodies once, remat
  # recomputes the forward, and a scanned stack is counted as one layer: XLA's count
  # is no model count then.
  assert abs(after[1] / before[1] - 1) > 0.1


def test_tiny_config_by_hand():
  config = compose("tiny")  # every width 32, mlp 64, one layer; 32 px photos, 8 px patches
  views = plan_terms(config.loss).views()
  assert views == {"trigger": ("i", "t", "m"), "recall": ("m",)}
  width, mlp, embed, length, rows = 32, 64, 32, 16, 16

  def block(tokens):  # q, k, v, out; scores and values; the MLP's two matmuls
    return 4 * 2 * tokens * width * width + 2 * 2 * tokens * tokens * width \
        + 2 * 2 * tokens * width * mlp

  image = 2 * 16 * (8 * 8 * 3) * width + block(16 + 1)  # patch embedding; 16 patches + CLS
  text = block(length)
  project, out = 2 * width * width, 2 * width * embed  # per token; the output projection
  head_i = 17 * project + block(1 + 17) + out
  head_t = length * project + block(1 + length) + out
  head_m = (17 + length) * project + block(1 + 17 + length) + out
  trigger = image + text + head_i + head_t + head_m
  recall = image + text + head_m
  # Scored once each: trigger m / t / i against recall m (PPM, PLC), t / i against
  # trigger m (PDC).
  loss = 5 * 2 * rows * rows * embed
  assert forward_flops_per_example(config.model, ("t",)) == text + head_t
  assert model_flops_per_step(config, views) == 3 * (rows * (trigger + recall) + loss)

  # The composed term (8 triplets): its reference photos' image-only view is a constant
  # to the loss, so that head call runs forward only.
  config.loss.composed.weight = 0.1
  views = plan_terms(config.loss).views()
  assert views["composed_trigger"] == ("i", "m") and views["composed_recall"] == ("m",)
  composed = 8 * (3 * (image + text + head_m) + head_i) + 8 * 3 * recall \
      + 3 * 2 * 2 * 8 * 8 * embed
  assert model_flops_per_step(config, views) == \
      3 * (rows * (trigger + recall) + loss) + composed


def test_loss_count_with_hard_negatives_and_composed_term_by_hand():
  config = compose("tiny")
  _varied(config)  # batch 16, 2 mined rows per trigger, 16 composed triplets, embed 32
  views = plan_terms(config.loss).views() | {"hard_negative": ("t", "m")}
  rows, hard, composed, embed = 16, 32, 16, 32
  # m-m, t-m, i-m and t-t score the recall view + the mined rows; PDC's t, i against
  # trigger m and PLC's t, m, i against the plain recall m score B columns; the
  # composed queries score the targets and the references.
  extended, plain = 4 * 2 * rows * (rows + hard) * embed, 5 * 2 * rows * rows * embed
  assert loss_forward_flops(config, views) == extended + plain + 2 * 2 * composed ** 2 * embed


def test_side_the_step_never_embeds_is_refused():
  config = compose("tiny")
  with pytest.raises(ValueError, match="unknown side 'query'"):
    model_flops_per_step(config, {"trigger": ("m",), "query": ("m",)})
  config.model.image.enabled = False
  with pytest.raises(ValueError, match=r"none of \('i',\) is available"):
    model_flops_per_step(config, {"trigger": ("i",)})
