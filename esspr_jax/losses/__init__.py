"""The contrastive loss unit (docs/losses.md): PPM, PDC, PLC, InfoNCE and sigmoid pair losses
as pure functions of embeddings, combined by `loss_unit` according to config.loss."""
from esspr_jax.losses.hinge import batch_hinge
from esspr_jax.losses.infonce import infonce
from esspr_jax.losses.locality import locality_consistency
from esspr_jax.config.loss_plan import PAIR_NAMES, plan_terms
from esspr_jax.losses.sigmoid import sigmoid_pairs
from esspr_jax.losses.unit import loss_unit

__all__ = ["loss_unit", "batch_hinge", "infonce", "sigmoid_pairs", "locality_consistency",
           "plan_terms", "PAIR_NAMES"]
