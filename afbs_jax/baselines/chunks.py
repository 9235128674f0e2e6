"""Query rows in chunks: token-level scores, selection and attention O(chunk · S) at a time, not O(T · S).

A chunk is a static number of consecutive query rows, a multiple of `ROW_MULTIPLE`; the last one is
padded past T with zero queries that see no key, keep nothing and are dropped. The chunks run in a
`lax.scan`, so a layer's [batch, heads, rows, S] temporaries exist for one chunk at a time, and a chunk's
causal geometry is built from iotas, never as a numpy [T, S] constant. Every row is selected as it would
be alone, so masks do not depend on the chunk size (outputs only to float rounding, the attention's
matrix shapes change).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ROW_MULTIPLE = 16  # Chunk sizes are multiples of this (H2O sums its rows in groups of it).


class Chunk(NamedTuple):
  """One chunk of C query rows over all S keys, bottom-right causal (`afbs_jax.baselines.layout`).

  Attributes:
    rows: int32 [C], the query index of each row (>= T for padding).
    valid: bool [C, S], causal-valid cells (none on padding rows).
    distance: int32 [C, S], how many keys back from the row's own position (negative above it).
    diagonal: bool [C, S], each row's own position.
    counts: int32 [C], each row's kept count (0 on padding rows).
  """

  rows: jax.Array
  valid: jax.Array
  distance: jax.Array
  diagonal: jax.Array
  counts: jax.Array


def chunk_size(q_len: int, query_chunk: int, multiple: int = ROW_MULTIPLE) -> int:
  """Rows per chunk: `query_chunk` rounded up to `multiple` (both powers of two), at most T rounded up."""
  return min(max(query_chunk, multiple), -(-q_len // multiple) * multiple)


def chunk_geometry(start: jax.Array | np.integer, size: int, q_len: int, kv_len: int,
                   counts: jax.Array | np.ndarray) -> Chunk:
  """The Chunk of query rows start .. start + size − 1 (start may be traced)."""
  rows = start + jnp.arange(size, dtype=jnp.int32)
  distance = (rows + (kv_len - q_len))[:, None] - jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  valid = (distance >= 0) & (rows < q_len)[:, None]
  return Chunk(rows=rows, valid=valid, distance=distance, diagonal=valid & (distance == 0),
               counts=jnp.asarray(counts, jnp.int32))


def scan_chunks(step: Callable[[Any, jax.Array, Chunk], tuple[Any, Any]], carry: Any, q: jax.Array,
                kv_len: int, size: int, counts: np.ndarray | None = None) -> tuple[Any, Any]:
  """Runs `step(carry, q_rows, chunk) -> (carry, out)` over the query chunks in order.

  Args:
    step: one chunk; q_rows: [batch, size, heads, head_dim].
    carry: the initial carry (any pytree, None for none).
    q: [batch, T, heads, head_dim].
    kv_len: S.
    size: rows per chunk (`chunk_size`).
    counts: int [T], each row's kept count (default 0).

  Returns:
    The last carry and every chunk's out stacked on a new leading axis [n_chunks, ...] (`join_chunks`).
  """
  batch, q_len = q.shape[:2]
  n_chunks = -(-q_len // size)
  pad = n_chunks * size - q_len
  q_chunks = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(batch, n_chunks, size, *q.shape[2:])
  counts = np.zeros(q_len, np.int32) if counts is None else counts
  xs = (jnp.moveaxis(q_chunks, 1, 0),                                  # [n_chunks, batch, size, heads, D]
        np.arange(n_chunks, dtype=np.int32) * size,
        np.pad(counts, (0, pad)).reshape(n_chunks, size).astype(np.int32))

  def one(carry, chunk_xs):
    q_rows, start, row_counts = chunk_xs
    return step(carry, q_rows, chunk_geometry(start, size, q_len, kv_len, row_counts))

  return jax.lax.scan(one, carry, xs)


def join_chunks(stacked: jax.Array, axis: int, length: int) -> jax.Array:
  """[n_chunks, ...] with the chunk's rows at `axis` of each chunk -> those rows joined, the first `length`."""
  joined = jnp.moveaxis(stacked, 0, axis)                              # [..., n_chunks, size, ...]
  shape = (*joined.shape[:axis], joined.shape[axis] * joined.shape[axis + 1], *joined.shape[axis + 2:])
  return jax.lax.slice_in_dim(joined.reshape(shape), 0, length, axis=axis)
