"""The loss unit: one pure function from both sides' {i, t, m} embeddings to a loss.

`config.loss` chooses the terms (see esspr_jax/config/loss_plan.py and docs/losses.md); this module
checks the inputs against that choice, places the terms (placement.py: with the batch
split over devices, each device scores its own query rows against the gathered
gallery) and adds them up.
"""
from typing import Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from esspr_jax.config.loss_plan import LossPlan, TermSpec, plan_terms
from esspr_jax.errors import ConfigError
from esspr_jax.losses.chunking import BlockTerm, run_block_terms
from esspr_jax.losses.composed import composed_infonce
from esspr_jax.losses import extra_gallery
from esspr_jax.losses.hinge import hinge_term
from esspr_jax.losses.infonce import infonce_term
from esspr_jax.losses.locality import locality_term
from esspr_jax.losses.placement import context_mesh, on_local_rows, row_split
from esspr_jax.losses.rows import WHOLE, RowShard
from esspr_jax.losses.sigmoid import sigmoid_term
from esspr_jax.unit_norm import l2_normalize
from esspr_jax.losses.weighting import weighted_total

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


Rows = Dict[Tuple[str, str], jax.Array]


def _needs_scalars(term: TermSpec, logit_scale, logit_bias) -> None:
  if term.kind in ("infonce", "sigmoid", "composed_infonce") and logit_scale is None:
    raise ConfigError(f"{term.key}.kind", f"{term.kind!r} needs logit_scale (the model's "
                      "'logit_scale' param); loss_unit was called without it")
  if term.kind == "sigmoid" and logit_bias is None:
    raise ConfigError(f"{term.key}.kind", "'sigmoid' needs logit_bias (the model's "
                      "'logit_bias' param); loss_unit was called without it")


def _block_term(term: TermSpec, plan: LossPlan, batch: int,
                logit_scale: Optional[jax.Array], logit_bias: Optional[jax.Array],
                shard: RowShard, gallery=None, columns=None) -> BlockTerm:
  """One pair/PDC/PLC term in blocked form, reading its views by (side, modality);
  `gallery`/`columns`: an extended gallery (hard negatives, extra_gallery.py)."""
  _needs_scalars(term, logit_scale, logit_bias)
  gallery = term.gallery if gallery is None else gallery
  if term.kind == "hinge":
    return hinge_term(term.query, gallery, batch, term.margin, shard=shard, columns=columns)
  if term.kind == "infonce":
    return infonce_term(term.query, gallery, batch, logit_scale, plan.max_logit_scale,
                        shard=shard)
  if term.kind == "sigmoid":
    return sigmoid_term(term.query, gallery, batch, logit_scale, logit_bias,
                        plan.max_logit_scale, shard=shard, columns=columns)
  if term.kind == "locality":
    return locality_term(term.query, term.anchor, term.gallery, batch, term.margin,
                         plan.top_k, shard=shard)
  raise AssertionError(f"unplanned term kind {term.kind!r}")


def _pair_terms(terms: Sequence[TermSpec], plan: LossPlan, rows: Rows, galleries: Rows,
                scalars, shard: RowShard = WHOLE) -> Dict[str, jax.Array]:
  """All pair, PDC and PLC terms in one pass over blocks of the query rows."""
  batch = galleries[terms[0].gallery].shape[0]  # every pair view has the same B
  galleries, extended = extra_gallery.extend_galleries(terms, galleries)
  blocked = {t.name: _block_term(t, plan, batch, *scalars, shard, *extended.get(t.name, ()))
             for t in terms}
  return run_block_terms(blocked, rows, galleries, plan.chunk_size, plan.precision, shard)


def _composed_term(term: TermSpec, plan: LossPlan, emb: Rows, scalars) -> jax.Array:
  _needs_scalars(term, *scalars)
  return composed_infonce(emb[term.query], emb[term.gallery], emb[term.anchor], scalars[0],
                          plan.max_logit_scale, precision=plan.precision)


def _whole_terms(plan: LossPlan, pairs: bool, emb: Rows, scalars,
                 mesh) -> Dict[str, jax.Array]:
  """The composed term and, if `pairs`, the others, over the whole batch on every
  device (XLA partitions them as it likes)."""
  def values(emb, scalars):
    out = _pair_terms(plan.terms, plan, emb, emb, scalars) if pairs else {}
    if plan.composed:
      out[plan.composed.name] = _composed_term(plan.composed, plan, emb, scalars)
    return out

  if mesh is None or not mesh.explicit_axes:
    return values(emb, scalars)
  # Under explicit sharding every op's output sharding must be typeable, and scores of
  # batch-sharded queries against a batch-sharded gallery have no legal type. Run these
  # terms with those axes in Auto mode: the partitioner gathers the (small) gallery.
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.sharding.auto_axes(values, axes=mesh.explicit_axes, out_sharding=P())(
        emb, scalars)


def _row_split_terms(plan: LossPlan, emb: Rows, scalars, mesh,
                     shard: RowShard) -> Dict[str, jax.Array]:
  """Pair/PDC/PLC terms with each device scoring its own query rows against the
  gathered gallery.

  Every gallery view is all-gathered once ([B, E]); a device's scores are its
  [B/n, B] block (or [chunk/n, B] blocks), and only per-term partial sums (and
  InfoNCE's per-column log-sum-exp pieces) cross devices."""
  gallery_refs = sorted({t.gallery for t in plan.terms}
                        | {ref for ref in emb if ref[0] == extra_gallery.HARD_SIDE})

  def per_device(local: Rows, scalars):
    galleries = {ref: shard.gather(local[ref]) for ref in gallery_refs}
    return _pair_terms(plan.terms, plan, local, galleries, scalars, shard)

  return on_local_rows(per_device, mesh, shard, emb, scalars)


def loss_unit(sides: Mapping[str, Embeddings], config, *,
              logit_scale: Optional[jax.Array] = None,
              logit_bias: Optional[jax.Array] = None,
              batch_axes: Optional[Sequence[str]] = None,
              loss_log_var: Optional[jax.Array] = None,
              with_weights: bool = False,
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Total loss and every enabled term by name ('ppm/m-m', 'pdc/t', 'plc/i', ...).

  sides: side name -> {'i','t','m'} -> [B, E]. 'trigger' and 'recall' are the two
  sides of B positive pairs; every other row of the batch is a negative (the global
  batch under jit with a sharded batch). With `loss.composed.weight` > 0,
  'composed_trigger' ({'m', 'i'}: fused (reference photo, modifier words) and the
  photo's image-only view, a hard negative) and 'composed_recall' ({'m'}: the wanted
  listing) hold the composed-query sub-batch, whose rows are each other's negatives
  only. An optional 'hard_negative' side (mined listings, train.hard_negatives) adds
  its rows to the gallery of every hinge / InfoNCE / sigmoid term against a recall
  view: a negative for every query (extra_gallery.py). `LossPlan.views()` says which
  side needs which modality. `config` is the run
  config's `loss` section. Embeddings are (re-)normalised here, in float32. `terms`
  holds unweighted values; total is the sum of weight * term.

  Traced under a mesh (`jax.set_mesh`) with the batch split over several devices,
  the pair, PDC and PLC terms run on each device's own query rows (placement.py);
  the split's mesh axes are those of logical 'batch' under the flax rules in effect,
  or `batch_axes` when given (`batch_axes=()` forces the whole-batch formulation,
  the benchmarks' baseline). The values equal the one-device loss either way.
  """
  plan = plan_terms(config)
  emb = _gather_inputs(plan, sides)
  emb.update(extra_gallery.hard_negative_rows(plan.terms, sides))
  scalars = tuple(None if v is None else jnp.asarray(v, jnp.float32)
                  for v in (logit_scale, logit_bias))
  mesh = context_mesh(emb.values())
  pair_emb = {ref: x for ref, x in emb.items() if not ref[0].startswith("composed")}
  shard = row_split(mesh, list(pair_emb.values()), batch_axes)
  if shard is None:
    values = _whole_terms(plan, True, emb, scalars, mesh)
  else:
    values = _row_split_terms(plan, pair_emb, scalars, mesh, shard)
    if plan.composed:  # small: it may stay whole
      composed_emb = {ref: x for ref, x in emb.items() if ref not in pair_emb}
      values.update(_whole_terms(plan, False, composed_emb, scalars, mesh))
  terms = {term.name: values[term.name] for term in plan.all_terms}
  total, weights = weighted_total(terms, plan, loss_log_var)
  if with_weights:
    terms.update({f"weight/{name}": w for name, w in weights.items()})
  return total, terms
