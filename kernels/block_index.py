"""Block masks: which blocks causal masking allows, and the per-row kept-block lists the kernels iterate.

Like FlexAttention's `kv_indices`/`kv_num_blocks` or splash attention's `MaskInfo`: a kernel program for
(batch, head, q block) reads `counts[b, h, i]` and visits `indices[b, h, i, :count]`, in ascending order,
never touching a skipped block. The backward pass walks the transposed lists (`mask_to_q_indices`: per
key block, the q blocks that keep it), and the forward's λ test reads which rows read a non-finite K/V
block (`nonfinite_kept_blocks`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def mask_to_kv_indices(mask: jax.Array, *, method: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Compacts a block mask into ascending kept-block index lists.

  Args:
    mask: bool [batch, heads, n_q_blocks, n_k_blocks].
    method: how: "argsort" (a stable sort of "not kept"), "scatter" (a running count gives every block
      its slot in that same order: a cumsum and one scatter, no sort) or "auto" (`COMPACTION_METHOD` of
      the default platform, "argsort" where it names none). Every method returns the same arrays, bit
      for bit.

  Returns:
    indices: int32 [batch, heads, n_q_blocks, n_k_blocks]; the first `counts` entries of each row are
      the kept key-block indices in ascending order; the remaining entries repeat the last kept index
      (or 0 for an empty row), so a pipelined loader that prefetches one step ahead never reads out of
      range and re-fetching the same block is free.
    counts: int32 [batch, heads, n_q_blocks], number of kept blocks per row.
  """
  if method == "auto":
    method = COMPACTION_METHOD.get(jax.default_backend(), "argsort")
  if method not in _COMPACTIONS:
    raise ValueError(f"method={method!r}; allowed: 'auto', {', '.join(map(repr, _COMPACTIONS))}")
  return _COMPACTIONS[method](jnp.asarray(mask, dtype=jnp.bool_))


def _compact_by_argsort(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  n_k = mask.shape[-1]
  counts = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  # A stable argsort of "not kept" puts kept indices first, each group in ascending order.
  order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
  last_kept = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  position = jnp.arange(n_k, dtype=jnp.int32)
  indices = jnp.where(position < counts[..., None], order, last_kept)
  return indices, counts


def _compact_by_scatter(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The argsort's permutation without a sort: kept block j goes to slot (kept blocks before j), skipped
  block j to counts + (skipped blocks before j); a row-wise cumsum gives both, one scatter places them."""
  n_k = mask.shape[-1]
  rows = mask.reshape(-1, n_k)                                              # [R, n_k]
  running = jnp.cumsum(rows, axis=-1, dtype=jnp.int32)                      # kept blocks up to and at j
  counts = running[:, -1]
  block = jnp.arange(n_k, dtype=jnp.int32)
  # A permutation of 0 .. n_k - 1 per row, so the scatter's indices are unique and in range.
  slot = jnp.where(rows, running - 1, counts[:, None] + block - running)
  row_id = jnp.broadcast_to(jnp.arange(rows.shape[0], dtype=jnp.int32)[:, None], rows.shape)
  order = jnp.zeros_like(rows, dtype=jnp.int32).at[row_id, slot].set(
      jnp.broadcast_to(block, rows.shape), unique_indices=True)
  last_kept = jnp.max(jnp.where(rows, block, 0), axis=-1)                   # 0 for an empty row
  indices = jnp.where(block < counts[:, None], order, last_kept[:, None])
  return indices.reshape(mask.shape), counts.reshape(mask.shape[:-1])


_COMPACTIONS = {"argsort": _compact_by_argsort, "scatter": _compact_by_scatter}

# The compaction "auto" runs per platform (jax.default_backend()); absent platforms sort. On the GPU the
# scatter form won in results/kernel_bench.json (H200, 32 heads, density 0.15): 2.0–2.5× faster at 64K
# (64×64 blocks: 0.49 vs 1.24 ms), 1.9× at 32K with 64×64, and within 0.013 ms of the sort elsewhere.
COMPACTION_METHOD: dict[str, str] = {"gpu": "scatter"}


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


def mask_to_q_indices(mask: jax.Array, kv_heads: int) -> tuple[jax.Array, jax.Array]:
  """The transposed kept lists: for each key block, the (query head, q block) pairs that keep it.

  A key block of kv head c is read by the query heads c * group + g, g < group = heads // kv_heads; the
  backward pass sums their gradients into one dk/dv tile, so the lists are per kv head and interleave
  the group: entry e stands for group member g = e // n_q_blocks and q block i = e % n_q_blocks.

  Args:
    mask: bool [batch, heads, n_q_blocks, n_k_blocks].
    kv_heads: divides heads.

  Returns:
    indices: int32 [batch, kv_heads, n_k_blocks, group * n_q_blocks], ascending entries g * n_q_blocks + i
      first, padded as in `mask_to_kv_indices`.
    counts: int32 [batch, kv_heads, n_k_blocks].
  """
  batch, heads, n_q, n_k = mask.shape
  group = heads // kv_heads
  transposed = jnp.asarray(mask, jnp.bool_).reshape(batch, kv_heads, group, n_q, n_k)
  transposed = transposed.transpose(0, 1, 4, 2, 3).reshape(batch, kv_heads, n_k, group * n_q)
  return mask_to_kv_indices(transposed)


def nonfinite_key_blocks(k: jax.Array, v: jax.Array, block_k: int) -> jax.Array:
  """int32 [batch, kv_heads, ceil(S / block_k)]: 1 where a key block's K or V rows hold a NaN or ±inf."""
  batch, kv_len, kv_heads, _ = k.shape
  n_k = math.ceil(kv_len / block_k)
  finite = jnp.isfinite(k).all(axis=-1) & jnp.isfinite(v).all(axis=-1)            # [batch, S, kv_heads]
  finite = jnp.pad(finite, ((0, 0), (0, n_k * block_k - kv_len), (0, 0)), constant_values=True)
  bad = ~finite.reshape(batch, n_k, block_k, kv_heads).all(axis=2)
  return bad.transpose(0, 2, 1).astype(jnp.int32)


def nonfinite_kept_blocks(k: jax.Array, v: jax.Array, kv_indices: jax.Array, kv_counts: jax.Array,
                          block_k: int) -> jax.Array:
  """int32 [batch, heads, n_q_blocks]: 1 where a row's kept key blocks hold a NaN or ±inf in K or V.

  Such a row never P·V-skips (`kernels.block_sparse_reference` says why). One pass over K and V plus a
  gather the size of the index lists: cheap next to attention.
  """
  kv_bad = nonfinite_key_blocks(k, v, block_k)
  heads = kv_indices.shape[1]
  per_head = jnp.repeat(kv_bad, heads // kv_bad.shape[1], axis=1)[:, :, None, :]   # [batch, heads, 1, n_k]
  bad = jnp.take_along_axis(jnp.broadcast_to(per_head, kv_indices.shape), kv_indices, axis=-1)
  kept = jnp.arange(kv_indices.shape[-1]) < kv_counts[..., None]
  return jnp.any((bad > 0) & kept, axis=-1).astype(jnp.int32)
