"""One training update: embed the views the loss needs, the loss, its gradients, the
optimizer step. Pure functions of (state, batch); `train.py` jits them.

A non-finite loss, gradient or update never reaches the params or the optimizer state.
"""
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from esspr_jax.config.constants import MODALITIES
from esspr_jax.losses.weighting import LOG_VAR

# (sides, *, logit_scale, logit_bias[, loss_log_var]) -> (total, {term: scalar}); sides
# maps a side name ('trigger', 'recall', 'composed_trigger', 'composed_recall') to
# {modality: [B, E]}. loss_log_var is passed only when the params hold it (learned
# uncertainty weighting). Entries 'weight/<term>' of the dict are logged as they are,
# every other entry as 'loss/<term>'.
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
# side name -> the modalities to embed it in (LossPlan.views() for the loss unit).
Views = Mapping[str, tuple[str, ...]]
ALL_VIEWS: Views = {"trigger": MODALITIES, "recall": MODALITIES}
# Params the loss reads itself (passed as loss_fn keywords), not through the model:
# the model's temperature/bias and, under 'uncertainty' weighting, the log-variances.
LOSS_PARAMS = ("logit_scale", "logit_bias", LOG_VAR)
WEIGHT_PREFIX = "weight/"


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
          "composed_recall": composed_recall,
          "hard_negative": jax.random.fold_in(rng, 2)}  # mined negatives (hard_negatives/)


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
    return _loss_of(sides, _loss_params(p), loss_fn)
  (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
  return loss, dict(terms), grads


def _constrain_rows(tree, *, leading: int):
  """Keeps the example dim on the batch axes (after `leading` unsharded dims), so the
  micro-batch split and join stay local to each device."""
  def one(x):
    names = (None,) * leading + ("batch",) + (None,) * (x.ndim - leading - 1)
    return nn.with_logical_constraint(x, names)
  return jax.tree_util.tree_map(one, tree)


def split_micro_batches(tree, micro_steps: int):
  """[rows, ...] -> [k, rows/k, ...]; micro-batch j holds rows j, j+k, j+2k, ...

  With the rows split evenly over the devices (and rows/k divisible by their number),
  every device keeps its own rows: no data moves."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if x.shape[0] % micro_steps:
      raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} has {x.shape[0]} rows, not "
                       f"divisible by train.grad_accum_steps={micro_steps}")

  def split(x):
    x = x.reshape((x.shape[0] // micro_steps, micro_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return _constrain_rows(jax.tree_util.tree_map(split, _constrain_rows(tree, leading=0)),
                         leading=1)


def join_micro_batches(tree):
  """The inverse of `split_micro_batches`: [k, rows/k, ...] -> [rows, ...] in the
  original row order (so trigger row r still pairs with recall row r)."""
  def join(x):
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return _constrain_rows(jax.tree_util.tree_map(join, _constrain_rows(tree, leading=1)),
                         leading=0)


def _loss_params(params) -> dict:
  """The params the loss reads itself (not through the model): LOSS_PARAMS."""
  return {name: params[name] for name in LOSS_PARAMS if name in params}


def _loss_of(sides, loss_params, loss_fn: LossFn):
  extra = {LOG_VAR: loss_params[LOG_VAR]} if LOG_VAR in loss_params else {}
  return loss_fn(sides, logit_scale=loss_params.get("logit_scale"),
                 logit_bias=loss_params.get("logit_bias"), **extra)


def accumulated_loss_and_grads(params, batch, rng, *, micro_steps, model, loss_fn: LossFn,
                               views: Views):
  """The full-batch loss and its exact gradients, with activations held for one
  micro-batch at a time (gradient caching).

  (a) embed the k micro-batches one after the other, forward only (no activations
      kept); (b) the loss once on the whole global batch of embeddings, with its gradient
      w.r.t. every embedding and w.r.t. the params it reads directly; (c) each micro-batch
      forward again under `jax.vjp`, with the same dropout rng as in (a), pulling its
      rows' cached embedding gradients back into param gradients, summed. Every row of
      the global batch stays every other row's negative, so loss and gradients do not
      depend on k (with dropout, micro-batch j draws its masks from fold_in(rng, j)).
      Micro-batch j takes rows j, j+k, ... (see `split_micro_batches`); the composed
      sub-batch is split the same way, by its own row count. k=1 is the plain path."""
  kw = dict(model=model, loss_fn=loss_fn, views=views)
  if micro_steps == 1:
    return loss_and_grads(params, batch, rng, **kw)
  micro_batches = split_micro_batches(batch, micro_steps)
  micro_rngs = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(micro_steps))
  embed = lambda p, micro_batch, micro_rng: embed_sides(p, micro_batch, micro_rng,
                                                        model=model, views=views)

  # (a) forward only: keeps [k, rows/k, E] embeddings, nothing else.
  def embed_one(_, inputs):
    micro_batch, micro_rng = inputs
    return None, embed(jax.lax.stop_gradient(params), micro_batch, micro_rng)
  _, stacked = jax.lax.scan(embed_one, None, (micro_batches, micro_rngs))
  sides = join_micro_batches(stacked)

  # (b) the loss on the whole global batch, differentiated w.r.t. its inputs only.
  (loss, terms), (side_grads, loss_param_grads) = jax.value_and_grad(
      _loss_of, argnums=(0, 1), has_aux=True)(sides, _loss_params(params), loss_fn)
  cached = split_micro_batches(side_grads, micro_steps)

  # (c) forward again per micro-batch, pulling the cached gradients back into params.
  def backward_one(grads_sum, inputs):
    micro_batch, micro_rng, micro_cotangent = inputs
    _, pullback = jax.vjp(lambda p: embed(p, micro_batch, micro_rng), params)
    (grads,) = pullback(micro_cotangent)
    return jax.tree_util.tree_map(jnp.add, grads_sum, grads), None
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(backward_one, zeros, (micro_batches, micro_rngs, cached))
  grads = flax.core.copy(grads, {name: grads[name] + g for name, g in loss_param_grads.items()})
  return loss, dict(terms), grads


def _metric_name(name: str) -> str:
  """'loss/ppm/m-m' for a term's value; a 'weight/ppm/m-m' entry stays as it is."""
  return name if name.startswith(WEIGHT_PREFIX) else f"loss/{name}"


def train_step(state: TrainState, batch, *, model, loss_fn, views, tx, schedule, base_rng,
               logical_rules, micro_steps):
  """One update. A non-finite loss, gradient or update leaves params and optimizer unchanged
  (the host then stops or counts a skip); the step counter always advances."""
  with nn.logical_axis_rules(logical_rules):
    rng = jax.random.fold_in(base_rng, state.step)
    loss, terms, grads = accumulated_loss_and_grads(
        state.params, batch, rng, micro_steps=micro_steps, model=model, loss_fn=loss_fn,
        views=views)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    # Finite gradients can still give a non-finite update (Adam's 0/0 with eps=0 on a
    # param without gradient); one norm more checks every new param.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)))
    new_params = optax.apply_updates(state.params, updates)
    keep_if_bad = lambda new, old: jax.tree_util.tree_map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1,
                           params=keep_if_bad(new_params, state.params),
                           opt_state=keep_if_bad(new_opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": finite.astype(jnp.float32),
               **{_metric_name(name): value for name, value in terms.items()}}
  return new_state, metrics
