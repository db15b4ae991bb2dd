"""Row-blocked evaluation of batch losses, so no device holds the full B x B matrix.

Every loss here is a sum over query rows of something computed against the whole
gallery (B x E, small); the rows may be this device's slice of the batch (`shard`,
rows.py). `scan_row_chunks` runs such a per-block function either once over all rows
(the plain formulation) or over blocks of `chunk_size` rows under
`lax.scan`, with `jax.checkpoint` on the block so the backward pass recomputes each
block's [chunk, B] scores instead of storing all of them.
"""
import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from esspr_jax.losses.rows import WHOLE, RowShard
from esspr_jax.losses.similarity import similarity

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


@dataclasses.dataclass(frozen=True)
class BlockTerm:
  """One loss term in row-blocked form: a carry, what a block of query rows adds to
  it, and the carry -> value step (where the cross-device reductions happen).

  The term reads the scores of its `queries` (keys of the scanned rows) against
  its `gallery` (a key of the galleries): `block(carry, scores, row_ids, row_valid)`
  gets scores as {query key: [C, B]}."""
  init: Any
  block: Callable[[Any, Mapping[Any, jax.Array], jax.Array, jax.Array], Any]
  finish: Callable[[Any], jax.Array]
  queries: Tuple[Any, ...]
  gallery: Any


def run_block_terms(terms: Mapping[str, BlockTerm], rows: Mapping[Any, jax.Array],
                    galleries: Mapping[Any, jax.Array], chunk_size: int,
                    precision: str, shard: RowShard = WHOLE) -> Dict[str, jax.Array]:
  """Every term's value from ONE pass over the blocks of `rows` ([B, E] each, or
  this device's rows under `shard`) against whole `galleries` ([B, E] each).

  Per block, the scores against each gallery come from one matmul of the stacked
  query views the terms read: each (query, gallery) block is scored once however
  many terms read it (PPM m-m and PLC share one), and the backward pass forms the
  gallery's gradient in one [B, E] product per gallery, not one per term."""
  queries_of: Dict[Any, list] = {}
  for term in terms.values():
    wanted = queries_of.setdefault(term.gallery, [])
    wanted.extend(q for q in term.queries if q not in wanted)
  read = {q for qs in queries_of.values() for q in qs}

  def body(carry, block_rows, ids, valid):
    scores = {}
    for gallery, queries in queries_of.items():
      stacked = jnp.concatenate([block_rows[q] for q in queries], axis=0)
      blocks = jnp.split(similarity(stacked, galleries[gallery], precision),
                         len(queries), axis=0)
      scores.update({(q, gallery): s for q, s in zip(queries, blocks)})
    return {name: term.block(carry[name], {q: scores[(q, term.gallery)]
                                           for q in term.queries}, ids, valid)
            for name, term in terms.items()}

  init = {name: term.init for name, term in terms.items()}
  carry = scan_row_chunks(body, init, {q: rows[q] for q in read}, chunk_size, shard)
  return {name: term.finish(carry[name]) for name, term in terms.items()}
