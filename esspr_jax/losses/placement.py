"""Where the loss runs: over each device's own query rows, or whole.

Under the train step the loss traces inside `jax.set_mesh(mesh)` and flax's logical
axis rules; the batch dim of every embedding is split over the mesh axes the logical
'batch' maps to. `row_split` reads that context (or, on an Explicit mesh, the inputs'
own sharding types) and says how the rows are split; `on_local_rows` runs a function
of this device's rows under `shard_map` over those axes. With no mesh, one device,
or a batch the split does not divide, there is no split and the whole-batch
formulation runs (one device, or XLA's own partitioning).
"""
import math
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import jax
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from esspr_jax import sharding
from esspr_jax.losses.rows import RowShard


def context_mesh(arrays: Iterable[jax.Array]) -> Optional[AbstractMesh]:
  """The mesh set by `jax.set_mesh`, else the one Explicit-typed inputs live on."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    for x in arrays:
      mesh = jax.typeof(x).sharding.mesh
      if not mesh.empty:
        break
  return None if mesh.empty else mesh


def _typed_batch_axes(arrays: Sequence[jax.Array]) -> Tuple[str, ...]:
  """Mesh axes of dim 0 in the inputs' sharding types (Explicit meshes only)."""
  for x in arrays:
    spec = jax.typeof(x).sharding.spec
    if spec and spec[0] is not None:
      return (spec[0],) if isinstance(spec[0], str) else tuple(spec[0])
  return ()


def row_split(mesh: Optional[AbstractMesh], arrays: Sequence[jax.Array],
              batch_axes: Optional[Sequence[str]] = None) -> Optional[RowShard]:
  """How the rows of `arrays` ([B, E] each) split over `mesh`; None for no split.

  batch_axes: the mesh axes of the batch dim; by default those of logical 'batch'
  under the flax rules in effect, else the inputs' Explicit sharding types."""
  if mesh is None:
    return None
  if batch_axes is None:
    axes = sharding.logical_batch_axes() or _typed_batch_axes(arrays)
    axes = tuple(a for a in axes if a in mesh.axis_names)
  else:
    axes = tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
      raise ValueError(f"loss_unit: batch_axes {axes} name {unknown}, which the mesh "
                       f"{dict(mesh.shape)} does not have")
  # Inside an enclosing shard_map the rows are already local: nothing more to split.
  axes = tuple(a for a in axes if a not in mesh.manual_axes)
  count = math.prod(mesh.shape[a] for a in axes)
  if count <= 1 or any(x.shape[0] % count for x in arrays):
    return None
  return RowShard(axes, count)


def on_local_rows(fn: Callable[[Any, Any], Any], mesh: AbstractMesh, shard: RowShard,
                  rows: Any, replicated: Any) -> Any:
  """fn(local rows, replicated) on every device; fn's outputs must be reduced over
  the shard's axes (they come back as one replicated value).

  rows: a pytree of [B, ...] arrays split over the shard's axes; replicated: a pytree
  every device sees whole (scalars). Every mesh axis is manual inside fn, so axes
  outside the batch split (tensor) hold copies of the same rows."""
  row_spec = P(shard.axes)
  if mesh.explicit_axes:  # shard_map takes Explicit inputs only as typed by in_specs
    with jax.sharding.use_abstract_mesh(mesh):
      rows = jax.tree_util.tree_map(lambda x: jax.sharding.reshard(x, row_spec), rows)
      replicated = jax.tree_util.tree_map(lambda x: jax.sharding.reshard(x, P()),
                                          replicated)
  return jax.shard_map(fn, mesh=mesh, in_specs=(row_spec, P()), out_specs=P())(
      rows, replicated)
