"""One training update: embed the views the loss needs, the loss, its gradients, the
optimizer step. Pure functions of (state, batch); `train.py` jits them.

A non-finite loss or gradient never reaches the params or the optimizer state.
"""
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from esspr_jax.config.constants import MODALITIES

# (sides, *, logit_scale, logit_bias) -> (total, {term: scalar}); sides maps a side name
# ('trigger', 'recall', 'composed_trigger', 'composed_recall') to {modality: [B, E]}.
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
# side name -> the modalities to embed it in (LossPlan.views() for the loss unit).
Views = Mapping[str, tuple[str, ...]]
ALL_VIEWS: Views = {"trigger": MODALITIES, "recall": MODALITIES}


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of batches consumed (int32 scalar)
  params: Any
  opt_state: Any


def batch_side(batch: Mapping[str, Any], side: str) -> Any:
  """The model input of one side: batch['trigger'], or batch['composed']['recall'] for
  'composed_recall'; None when the batch has no such side."""
  if side.startswith("composed_"):
    composed = batch.get("composed")
    return None if composed is None else composed.get(side[len("composed_"):])
  return batch.get(side)


def _side_rngs(rng: jax.Array) -> dict[str, jax.Array]:
  """One dropout stream per side, each a pure function of the step's rng."""
  trigger, recall = jax.random.split(rng)
  composed_trigger, composed_recall = jax.random.split(jax.random.fold_in(rng, 1))
  return {"trigger": trigger, "recall": recall, "composed_trigger": composed_trigger,
          "composed_recall": composed_recall}


def embed_sides(params, batch, rng, *, model: nn.Module, views: Views,
                train: bool = True) -> dict[str, dict[str, jax.Array]]:
  """{side: {modality: [rows, E]}} for every side in `views` the batch holds."""
  rngs = _side_rngs(rng)
  out = {}
  for side, modalities in views.items():
    inputs = batch_side(batch, side)
    if inputs is None:
      continue
    out[side] = model.apply({"params": params}, inputs, train=train,
                            modalities=tuple(modalities), rngs={"dropout": rngs[side]})
  return out


def loss_and_grads(params, batch, rng, *, model, loss_fn: LossFn, views: Views):
  def loss_of(p):
    sides = embed_sides(p, batch, rng, model=model, views=views)
    return loss_fn(sides, logit_scale=p.get("logit_scale"), logit_bias=p.get("logit_bias"))
  (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
  return loss, dict(terms), grads


def accumulated_loss_and_grads(params, batch, rng, *, micro_steps, **kw):
  """Mean loss/grads over `micro_steps` micro-batches, one at a time (less memory).

  Micro-batch j takes rows j, j+k, j+2k, ... so every device keeps its own rows."""
  if micro_steps == 1:
    return loss_and_grads(params, batch, rng, **kw)

  def split(x):
    x = x.reshape((x.shape[0] // micro_steps, micro_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  micro = jax.tree_util.tree_map(split, batch)

  def body(carry, inputs):
    loss_sum, terms_sum, grads_sum = carry
    index, micro_batch = inputs
    loss, terms, grads = loss_and_grads(params, micro_batch, jax.random.fold_in(rng, index),
                                        **kw)
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
    return (loss_sum + loss, add(terms_sum, terms), add(grads_sum, grads)), None

  first_loss, first_terms, first_grads = loss_and_grads(
      params, jax.tree_util.tree_map(lambda x: x[0], micro), jax.random.fold_in(rng, 0), **kw)
  rest = jax.tree_util.tree_map(lambda x: x[1:], micro)
  (loss, terms, grads), _ = jax.lax.scan(
      body, (first_loss, first_terms, first_grads), (jnp.arange(1, micro_steps), rest))
  scale = lambda t: jax.tree_util.tree_map(lambda x: x / micro_steps, t)
  return loss / micro_steps, scale(terms), scale(grads)


def train_step(state: TrainState, batch, *, model, loss_fn, views, tx, schedule, base_rng,
               logical_rules, micro_steps):
  """One update. A non-finite loss or gradient leaves params and optimizer unchanged
  (the host then stops or counts a skip); the step counter always advances."""
  with nn.logical_axis_rules(logical_rules):
    rng = jax.random.fold_in(base_rng, state.step)
    loss, terms, grads = accumulated_loss_and_grads(
        state.params, batch, rng, micro_steps=micro_steps, model=model, loss_fn=loss_fn,
        views=views)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep_if_bad = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1,
                           params=keep_if_bad(new_params, state.params),
                           opt_state=keep_if_bad(new_opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": finite.astype(jnp.float32),
               **{f"loss/{name}": value for name, value in terms.items()}}
  return new_state, metrics
