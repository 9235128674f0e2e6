"""Block masks: which blocks causal masking allows, and the per-row kept-block lists the kernels iterate.

Like FlexAttention's `kv_indices`/`kv_num_blocks` or splash attention's `MaskInfo`: a kernel program for
(batch, head, q block) reads `counts[b, h, i]` and visits `indices[b, h, i, :count]`, in ascending order,
never touching a skipped block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def mask_to_kv_indices(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Compacts a block mask into ascending kept-block index lists.

  Args:
    mask: bool [batch, heads, n_q_blocks, n_k_blocks].

  Returns:
    indices: int32 [batch, heads, n_q_blocks, n_k_blocks]; the first `counts` entries of each row are
      the kept key-block indices in ascending order; the remaining entries repeat the last kept index
      (or 0 for an empty row), so a pipelined loader that prefetches one step ahead never reads out of
      range and re-fetching the same block is free.
    counts: int32 [batch, heads, n_q_blocks], number of kept blocks per row.
  """
  mask = jnp.asarray(mask, dtype=jnp.bool_)
  n_k = mask.shape[-1]
  counts = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  # A stable argsort of "not kept" puts kept indices first, each group in ascending order.
  order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
  last_kept = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  position = jnp.arange(n_k, dtype=jnp.int32)
  indices = jnp.where(position < counts[..., None], order, last_kept)
  return indices, counts


def causal_block_mask(q_len: int, kv_len: int, *, causal: bool, block_q: int, block_k: int) -> np.ndarray:
  """Which blocks hold at least one unmasked element (static shapes, so numpy).

  Element (t, u) is unmasked iff t < T, u < S and, when causal, u <= t + S - T (bottom-right aligned).

  Returns:
    bool [ceil(T / block_q), ceil(S / block_k)].
  """
  n_q, n_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
  if not causal:
    return np.ones((n_q, n_k), dtype=bool)
  last_query = np.minimum((np.arange(n_q) + 1) * block_q, q_len) - 1
  first_key = np.arange(n_k) * block_k
  return first_key[None, :] <= last_query[:, None] + (kv_len - q_len)


def local_block_mask(q_len: int, kv_len: int, *, block_q: int, block_k: int, window: int) -> np.ndarray:
  """Each query block's `window` most recent causal key blocks: a local band along the diagonal.

  Bottom-right aligned like `causal_block_mask`: the most recent key block of query block i is the one
  holding key (last query of i) + S − T; the band is it and the `window` − 1 blocks before it.

  Returns:
    bool [ceil(T / block_q), ceil(S / block_k)]; all False when `window` is 0.
  """
  n_q, n_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
  last_query = np.minimum((np.arange(n_q) + 1) * block_q, q_len) - 1
  # Floor division keeps a row that sees no key (S < T) at a negative last block, so it keeps nothing.
  last_block = (last_query + kv_len - q_len) // block_k
  distance = last_block[:, None] - np.arange(n_k)[None, :]
  return (distance >= 0) & (distance < window)
