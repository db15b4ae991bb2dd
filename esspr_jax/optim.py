"""The optimizer: AdamW with warmup + cosine, global-norm clipping and a decay mask.

Weight decay pulls weights toward zero; on norms, biases, embedding tables, the
logit scale/bias and the loss's learned log-variances (pulling them to 0 would pull
the learned weighting back to 'fixed') that only hurts, so those are masked out. The mask is decided from
the param's name and its logical axis names, which the model already provides.
"""
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec

from esspr_jax.losses.weighting import LOG_VAR


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine (or constant) to the end."""
  peak = float(train_config.optimizer.learning_rate)
  s = train_config.schedule
  warmup = int(s.warmup_steps)
  if s.name == "warmup_constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
        [warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(int(train_config.steps), warmup + 1),
      end_value=peak * float(s.end_lr_ratio))


def decay_mask(params: Any, logical_spec_tree: Any, no_decay_names=(),
               no_decay_axes=()) -> Any:
  """True for the leaves weight decay applies to: matrices that are not embeddings.

  `logical_spec_tree` mirrors `params` with each leaf's logical PartitionSpec (P() for
  leaves without names).
  """
  no_decay_names = set(no_decay_names)
  no_decay_axes = set(no_decay_axes)
  specs = jax.tree_util.tree_leaves(
      logical_spec_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if len(specs) != len(paths_leaves):
    raise ValueError(f"logical spec tree has {len(specs)} leaves, params {len(paths_leaves)}")
  mask = []
  for (path, leaf), spec in zip(paths_leaves, specs):
    leaf_name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    axes = {a for a in spec if isinstance(a, str)}
    mask.append(jax.numpy.ndim(leaf) >= 2 and leaf_name not in no_decay_names
                and not axes & no_decay_axes)
  return jax.tree_util.tree_unflatten(treedef, mask)


def make_optimizer(train_config, params: Any, logical_spec_tree: Any
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> AdamW with a decay mask, schedule) from `config.train`."""
  o = train_config.optimizer
  schedule = learning_rate_schedule(train_config)
  mask = decay_mask(params, logical_spec_tree, tuple(o.no_decay_names) + (LOG_VAR,),
                    o.no_decay_axes)
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(o.clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                           weight_decay=float(o.weight_decay), mask=mask))
  return optax.chain(*parts), schedule
