"""Pure-jnp block-sparse attention with the λ P·V skip: the semantics every block-sparse kernel must match.

For each (batch, head, q block) the kept key blocks are visited in ascending order with an f32 online
softmax. Before a block's P·V runs, Δ = max over the rows that have an unmasked logit in the tile of
(tile row max − running row max) is compared with the head's λ: if Δ < λ the block adds nothing (not to
the numerator, not to the denominator, not to the running max) and counts as P·V-skipped. The first block
a row computes has Δ = +∞ and always runs; λ = −∞ never skips. Masking is token-level: element (t, u) takes
part iff t < T, u < S and, when causal, u ≤ t + S − T (the last query is aligned with the last key). A row
that ends with an empty denominator outputs exactly 0. The skip rule is SpargeAttn's; `kernels.sparge`
documents the differences from its CUDA kernels.

Non-finite inputs (NaN, ±inf) are never hidden by the skip. A (batch, head, q block) is *tainted* when
its q rows, or the K or V rows of a key block it keeps, hold a non-finite value (padding is zeros, never
bad). A tainted q block computes every kept tile, even one where no row has a finite logit, and skips no
P·V (Δ is not trustworthy there, and NaN compares differently on each platform: Triton's max ignores
NaN, XLA's propagates it). The values then flow through the arithmetic of dense softmax attention: a row
with a NaN or +inf logit among its unmasked elements gets NaN, a −inf logit has weight 0, and a NaN/inf
in V reaches every row of the q block that computes its tile (P·V multiplies it by the row's weight, and
0·NaN = NaN as in a dense matmul). With every causal-valid block kept, a tainted q block's rows are thus
exactly dense attention's rows, NaN where dense is NaN; rows of untainted q blocks never see the bad
values; and a row is 0 only when it has no unmasked element in its computed tiles (its denominator is
exactly 0; a NaN denominator stays NaN).

Differentiation: the VJP of this function defines the gradients of every backend. The block mask and
the P·V-skip decisions are constants for differentiation (the decisions are comparisons; λ gets no
gradient), so the gradient is that of softmax attention over the computed tiles' unmasked elements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


_HIGHEST = jax.lax.Precision.HIGHEST


def _pad_to(x: jax.Array, axis: int, length: int) -> jax.Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def _unmasked_in_tile(key_block: jax.Array, *, q_len: int, kv_len: int, n_q: int, causal: bool,
                      block_q: int, block_k: int) -> jax.Array:
  """bool [n_q, block_q, block_k]: which elements of key block `key_block` (traced) take part."""
  t = jnp.arange(n_q * block_q).reshape(n_q, block_q, 1)
  u = key_block * block_k + jnp.arange(block_k)
  unmasked = (t < q_len) & (u < kv_len)
  if causal:
    unmasked &= u <= t + (kv_len - q_len)
  return unmasked


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "sm_scale"))
def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                                     lam: jax.Array | float | None, *, causal: bool, block_q: int,
                                     block_k: int, sm_scale: float) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention over the kept blocks of `mask`, skipping P·V where Δ < λ.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    mask: bool [batch, heads, ceil(T / block_q), ceil(S / block_k)]; a kept block with no unmasked
      element is a no-op (it is neither computed nor counted as skipped) unless its q block is tainted
      (module docstring).
    lam: None (no skip), a scalar or f32 [heads]; natural-log units, <= 0.
    causal, block_q, block_k, sm_scale: static; logits are sm_scale * q·k in f32.

  Returns:
    out: [batch, T, heads, head_dim] in q.dtype.
    pv_skipped: int32 [batch, heads, n_q_blocks], visited blocks whose P·V was skipped.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  n_q, n_k = mask.shape[2], mask.shape[3]
  # q tiles: [batch, kv_heads, group, n_q, block_q, head_dim]; query head h = kv_head * group + g.
  q_tiles = _pad_to(q.astype(jnp.float32), 1, n_q * block_q)
  q_tiles = q_tiles.reshape(batch, n_q, block_q, kv_heads, group, head_dim).transpose(0, 3, 4, 1, 2, 5)
  # Key/value tiles, scanned over the leading axis: [n_k, batch, kv_heads, block_k, head_dim].
  def kv_tiles(x):
    x = _pad_to(x.astype(jnp.float32), 1, n_k * block_k)
    return x.reshape(batch, n_k, block_k, kv_heads, head_dim).transpose(1, 0, 3, 2, 4)
  kept = jnp.moveaxis(mask.astype(jnp.bool_).reshape(batch, kv_heads, group, n_q, n_k), -1, 0)
  # Tainted q blocks (see the module docstring): a non-finite value in the q block or in the K or V of a
  # key block it keeps.
  k_tiles, v_tiles = kv_tiles(k), kv_tiles(v)
  kv_bad = ~(jnp.isfinite(k_tiles).all(axis=(-2, -1)) & jnp.isfinite(v_tiles).all(axis=(-2, -1)))
  tainted = ~jnp.isfinite(q_tiles).all(axis=(-2, -1)) | (kept & kv_bad[..., None, None]).any(axis=0)
  lam = jnp.asarray(-jnp.inf if lam is None else lam, jnp.float32)
  lam = jnp.broadcast_to(lam, (heads,)).reshape(1, kv_heads, group, 1)

  def visit(carry, tile):
    m, l, acc, skipped = carry
    key_block, k_tile, v_tile, kept_tile = tile
    unmasked = _unmasked_in_tile(key_block, q_len=q_len, kv_len=kv_len, n_q=n_q, causal=causal,
                                 block_q=block_q, block_k=block_k)
    s = sm_scale * jnp.einsum("bkgiqd,bkcd->bkgiqc", q_tiles, k_tile, precision=_HIGHEST)
    s = jnp.where(unmasked, s, -jnp.inf)
    tile_max = s.max(axis=-1)                                   # [b, kv, g, n_q, block_q]
    takes_part = tile_max > -jnp.inf
    gap = jnp.where(m == -jnp.inf, jnp.inf, tile_max - m)
    delta = jnp.where(takes_part, gap, -jnp.inf).max(axis=-1)    # [b, kv, g, n_q]
    active = kept_tile & takes_part.any(axis=-1)
    skip = active & (delta < lam) & ~tainted
    compute = ((active | (kept_tile & tainted)) & ~skip)[..., None]
    m_new = jnp.maximum(m, tile_max)
    # A row that has seen no unmasked logit keeps m = -inf; shift by 0 so exp() gives 0, not NaN.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - shift)
    p = jnp.exp(s - shift[..., None])
    l_new = alpha * l + p.sum(axis=-1)
    acc_new = alpha[..., None] * acc + jnp.einsum("bkgiqc,bkcd->bkgiqd", p, v_tile, precision=_HIGHEST)
    carry = (jnp.where(compute, m_new, m), jnp.where(compute, l_new, l),
             jnp.where(compute[..., None], acc_new, acc), skipped + skip.astype(jnp.int32))
    return carry, None

  row_shape = (batch, kv_heads, group, n_q, block_q)
  init = (jnp.full(row_shape, -jnp.inf, jnp.float32), jnp.zeros(row_shape, jnp.float32),
          jnp.zeros(row_shape + (head_dim,), jnp.float32), jnp.zeros(row_shape[:-1], jnp.int32))
  tiles = (jnp.arange(n_k), k_tiles, v_tiles, kept)
  (_, l, acc, skipped), _ = jax.lax.scan(visit, init, tiles)
  # Only an exactly empty denominator gives 0; a NaN one (bad values) stays NaN.
  empty = (l == 0)[..., None]
  out = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, l[..., None]))
  out = out.transpose(0, 3, 4, 1, 2, 5).reshape(batch, n_q * block_q, heads, head_dim)[:, :q_len]
  return out.astype(q.dtype), skipped.reshape(batch, heads, n_q)
