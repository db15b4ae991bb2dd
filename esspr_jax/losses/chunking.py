"""Row-blocked evaluation of batch losses, so no device holds the full B x B matrix.

Every loss here is a sum over query rows of something computed against the whole
gallery (B x E, small); the rows may be this device's slice of the batch (`shard`,
rows.py). `scan_row_chunks` runs such a per-block function either once over all rows
(the plain formulation) or over blocks of `chunk_size` rows under
`lax.scan`, with `jax.checkpoint` on the block so the backward pass recomputes each
block's [chunk, B] scores instead of storing all of them.
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from esspr_jax.losses.rows import WHOLE, RowShard

# body(carry, query_rows, row_ids, row_valid) -> carry. query_rows is a pytree of
# [C, ...] arrays; row_ids int32[C] are the rows' positions in the batch (the column of
# each row's positive); row_valid bool[C] is False on padding rows.
BlockFn = Callable[[Any, Any, jax.Array, jax.Array], Any]


def scan_row_chunks(body: BlockFn, carry: Any, rows: Any, chunk_size: int,
                    shard: RowShard = WHOLE) -> Any:
  """Folds `body` over blocks of query rows; returns the final carry.

  chunk_size 0 (or >= B) means one block holding every row. Otherwise the rows are
  padded with zeros to a multiple of chunk_size (padding rows have row_valid False,
  so bodies must mask them) and split into n = ceil(B / chunk_size) *strided*
  blocks: block s holds rows s, s+n, s+2n, ... . With the batch sharded over devices
  each device then owns a slice of every block, so all devices work on every step.

  Under a split `shard`, `rows` are this device's slice of the batch: chunk_size
  still counts rows of the global batch (each device takes its share of every
  block), the row ids given to `body` are global, and the carry is per device.
  """
  leaves = jax.tree_util.tree_leaves(rows)
  batch = leaves[0].shape[0]
  first_row = shard.first_row(batch)
  chunk_size = shard.block_rows(chunk_size)
  if chunk_size <= 0 or chunk_size >= batch:
    return body(carry, rows, first_row + jnp.arange(batch, dtype=jnp.int32),
                jnp.ones((batch,), dtype=bool))

  num_blocks = -(-batch // chunk_size)
  padded = num_blocks * chunk_size

  def to_blocks(x: jax.Array) -> jax.Array:
    # [B, ...] -> [padded, ...] -> [chunk, n, ...] -> [n, chunk, ...];
    # block s, slot c holds row c * n + s.
    x = jnp.pad(x, [(0, padded - batch)] + [(0, 0)] * (x.ndim - 1))
    return jnp.swapaxes(x.reshape((chunk_size, num_blocks) + x.shape[1:]), 0, 1)

  row_ids = jnp.arange(padded, dtype=jnp.int32).reshape(chunk_size, num_blocks).T
  blocks = jax.tree_util.tree_map(to_blocks, rows)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # scan already blocks CSE
  def step(carry, xs):
    block, ids = xs
    return body(carry, block, first_row + ids, ids < batch), None

  carry, _ = jax.lax.scan(step, shard.per_device(carry), (blocks, row_ids))
  return carry
