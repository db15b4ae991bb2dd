"""The loss unit: one pure function from both sides' {i, t, m} embeddings to a loss.

`config.loss` chooses the terms (see plan.py and docs/losses.md); this module only
checks the inputs against that choice and adds the terms up.
"""
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from esspr_jax.errors import ConfigError
from esspr_jax.losses.composed import composed_infonce
from esspr_jax.losses.hinge import batch_hinge
from esspr_jax.losses.infonce import infonce
from esspr_jax.losses.locality import locality_consistency
from esspr_jax.config.loss_plan import LossPlan, TermSpec, plan_terms
from esspr_jax.losses.sigmoid import sigmoid_pairs
from esspr_jax.losses.similarity import l2_normalize

Embeddings = Mapping[str, jax.Array]


def _gather_inputs(plan: LossPlan,
                   sides: Mapping[str, Embeddings]) -> Dict[Tuple[str, str], jax.Array]:
  """Normalised embeddings each term reads; clear errors (at trace time) otherwise.

  The pairs' terms share one [B, E] shape; the composed term's rows share their own."""
  needed = {}
  for term in plan.all_terms:
    for side, modality in term.refs:
      if side not in sides:
        if term is plan.composed:
          raise ConfigError(f"{term.key}.weight", "the composed-query term is on but the "
                            "step got no composed sub-batch; set train.composed_batch_size "
                            "and data.pipeline.composed_dataset, or this weight to 0")
        raise ValueError(f"loss_unit: term {term.name!r} needs side {side!r}; "
                         f"got sides {sorted(sides)}")
      emb = sides[side]
      if modality not in emb:
        raise ConfigError(
            term.key, f"term {term.name!r} needs the {side} side's {modality!r} "
            f"embedding, but it has only {sorted(emb)}; set {term.key}.weight=0 or "
            "make the model produce it")
      needed[(side, modality)] = emb[modality]
  for group in ("pairs", "composed"):
    shapes = {f"{side}[{modality!r}]": tuple(x.shape) for (side, modality), x in needed.items()
              if side.startswith("composed") == (group == "composed")}
    if shapes and (any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) != 1):
      what = "the composed sub-batch's" if group == "composed" else "every pair"
      raise ValueError(f"loss_unit: {what} embeddings must be [B, E] with one shared B and "
                       f"E, got {shapes}")
  return {ref: l2_normalize(x) for ref, x in needed.items()}


def _term_value(term: TermSpec, plan: LossPlan, emb: Dict[Tuple[str, str], jax.Array],
                logit_scale: Optional[jax.Array],
                logit_bias: Optional[jax.Array]) -> jax.Array:
  opts = dict(chunk_size=plan.chunk_size, precision=plan.precision)
  query, gallery = emb[term.query], emb[term.gallery]
  if term.kind in ("infonce", "sigmoid", "composed_infonce") and logit_scale is None:
    raise ConfigError(f"{term.key}.kind", f"{term.kind!r} needs logit_scale (the model's "
                      "'logit_scale' param); loss_unit was called without it")
  if term.kind == "hinge":
    return batch_hinge(query, gallery, term.margin, **opts)
  if term.kind == "infonce":
    return infonce(query, gallery, logit_scale, plan.max_logit_scale, **opts)
  if term.kind == "sigmoid":
    if logit_bias is None:
      raise ConfigError(f"{term.key}.kind", "'sigmoid' needs logit_bias (the model's "
                        "'logit_bias' param); loss_unit was called without it")
    return sigmoid_pairs(query, gallery, logit_scale, logit_bias, plan.max_logit_scale,
                         **opts)
  if term.kind == "composed_infonce":
    return composed_infonce(query, gallery, emb[term.anchor], logit_scale,
                            plan.max_logit_scale, precision=plan.precision)
  if term.kind == "locality":
    return locality_consistency(query, emb[term.anchor], gallery, term.margin, plan.top_k,
                                **opts)
  raise AssertionError(f"unplanned term kind {term.kind!r}")


def _explicit_mesh(arrays) -> Optional[jax.sharding.AbstractMesh]:
  """The mesh with Explicit axes the inputs are typed on, if any."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    for x in arrays:
      mesh = jax.typeof(x).sharding.mesh
      if not mesh.empty:
        break
  return None if mesh.empty or not mesh.explicit_axes else mesh


def loss_unit(sides: Mapping[str, Embeddings], config, *,
              logit_scale: Optional[jax.Array] = None,
              logit_bias: Optional[jax.Array] = None,
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Total loss and every enabled term by name ('ppm/m-m', 'pdc/t', 'plc/i', ...).

  sides: side name -> {'i','t','m'} -> [B, E]. 'trigger' and 'recall' are the two
  sides of B positive pairs; every other row of the batch is a negative (the global
  batch under jit with a sharded batch). With `loss.composed.weight` > 0,
  'composed_trigger' ({'m', 'i'}: fused (reference photo, modifier words) and the
  photo's image-only view, a hard negative) and 'composed_recall' ({'m'}: the wanted
  listing) hold the composed-query sub-batch, whose rows are each other's negatives
  only. `LossPlan.views()` says which side needs which modality. `config` is the run
  config's `loss` section. Embeddings are (re-)normalised here, in float32. `terms`
  holds unweighted values; total is the sum of weight * term.
  """
  plan = plan_terms(config)
  emb = _gather_inputs(plan, sides)
  scalars = [None if v is None else jnp.asarray(v, jnp.float32)
             for v in (logit_scale, logit_bias)]

  def add_terms(emb, scalars):
    terms = {}
    total = jnp.zeros((), jnp.float32)
    for term in plan.all_terms:
      value = _term_value(term, plan, emb, *scalars)
      terms[term.name] = value
      total = total + term.weight * value
    return total, terms

  mesh = _explicit_mesh(emb.values())
  if mesh is None:
    return add_terms(emb, scalars)
  # Under explicit sharding every op's output sharding must be typeable, and scores of
  # batch-sharded queries against a batch-sharded gallery have no legal type. Run the
  # loss with those axes in Auto mode: the partitioner gathers the (small) gallery.
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.sharding.auto_axes(add_terms, axes=mesh.explicit_axes, out_sharding=P())(
        emb, scalars)
