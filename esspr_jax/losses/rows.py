"""Which query rows this device scores, and how its partial sums become global ones.

Every batch loss is a sum over query rows of something computed against the whole
gallery. With the batch split over devices (inside `shard_map` over the batch mesh
axes), a device holds B/n query rows: it gathers the [B, E] gallery once, scores
its own [B/n, B] block, and the partial sums meet in a `psum`. No device ever holds,
or receives, another device's scores. `WHOLE` is the one-device case: every row is
local and the reductions are the identity, so a term has one code path for both.
"""
import dataclasses
from typing import Any, Tuple

import jax


@dataclasses.dataclass(frozen=True)
class RowShard:
  """This device's contiguous slice of the batch rows, `count` slices over `axes`."""
  axes: Tuple[str, ...] = ()
  count: int = 1

  @property
  def split(self) -> bool:
    return self.count > 1

  def first_row(self, local_rows: int) -> jax.Array | int:
    """Global index of local row 0 (slice i of the batch starts at i * local_rows)."""
    return jax.lax.axis_index(self.axes) * local_rows if self.split else 0

  def block_rows(self, chunk_size: int) -> int:
    """Local rows per block: `loss.chunk_size` counts rows of the global batch, so
    each device takes its 1/count share of every block (0 = no blocking)."""
    return -(-chunk_size // self.count) if chunk_size > 0 else 0

  def per_device(self, x: Any) -> Any:
    """Marks x (e.g. a loop's initial carry) as differing between devices, the type
    of anything computed from local rows (shard_map's varying-axes typing)."""
    if not self.split:
      return x
    return jax.tree_util.tree_map(lambda v: jax.lax.pcast(v, self.axes, to="varying"), x)

  def gather(self, x: jax.Array) -> jax.Array:
    """[B/n, ...] local rows -> [B, ...] global rows, in batch order."""
    return jax.lax.all_gather(x, self.axes, axis=0, tiled=True) if self.split else x

  def sum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.axes) if self.split else x

  def max(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmax(x, self.axes) if self.split else x


WHOLE = RowShard()
