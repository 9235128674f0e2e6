"""Block-sparse flash attention with the λ P·V skip, as a Pallas kernel lowered through Triton (GPU).

One program handles one (q block, batch, head) and walks only the key blocks its row keeps, read from the
compact lists of `kernels.block_index.mask_to_kv_indices`, with an online softmax in f32 (base-2 exponent,
log2(e) folded into the logit scale). Per visited tile it decides the SpargeAttn P·V skip: the tile is
skipped when, over the query rows that take part, the largest gain of the tile max over the running max is
below λ. Blocks fully inside the causal/ragged region run without an element mask; only the short suffix of
boundary blocks of a row applies one. GQA reads kv head h // (heads // kv_heads) through the index map, so
K and V are never repeated. `interpret=True` runs the same kernel on CPU. The jnp reference in
`kernels.block_sparse_reference` defines the semantics, non-finite inputs included: a q block whose q rows
or kept K/V blocks hold a NaN or ±inf never skips P·V. With `return_residuals=True` the kernel also
writes what `kernels.block_sparse_backward` needs (per-row log-sum-exp, which kept tiles were skipped);
without it, it is exactly the kernel that runs when no gradient is taken.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from kernels.block_config import check_block_size
from kernels.block_index import nonfinite_kept_blocks

_LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchConfig:
  """Triton launch parameters: warps per program and software-pipelining depth of the key-block loop."""

  num_warps: int
  num_stages: int

  @staticmethod
  def lambda_free_variant_pays(block_q: int, block_k: int) -> bool:
    """Whether compiling the per-tile λ test out speeds up dense-mode runs (H100, 32K causal, d=128).

    It saves the cross-row reduction and branch per tile (64x64: 29.7 -> 24.4 ms, 128x128: 25.5 -> 21.9),
    except for block_q < block_k, where Triton schedules the branch-free loop worse (23.7 -> 29.6 ms).
    """
    return block_q >= block_k

  @classmethod
  def get_default(cls, block_q: int, block_k: int, pv_skip: bool) -> LaunchConfig:
    """Fastest dense-mode settings measured on an H100 (`kernel_bench.py --mode=sweep`, bf16, d=128)."""
    if block_q >= 128:
      return cls(num_warps=8, num_stages=3 if pv_skip else 2)
    return cls(num_warps=4, num_stages=2 if block_k <= 64 else 3)


def _compiler_params(config: LaunchConfig):
  # The Triton params class was renamed between JAX releases (TritonCompilerParams -> CompilerParams).
  params_class = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return params_class(num_warps=config.num_warps, num_stages=config.num_stages)


# HIGHEST keeps f32 inputs out of TF32 (the Triton default); bf16/f16 inputs use the tensor cores either way.
def _dot_transposed_rhs(a: jax.Array, b: jax.Array) -> jax.Array:
  """a: [m, d], b: [n, d] -> a @ b.T in f32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a: [m, k], b: [k, n] -> a @ b in f32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _num_unmasked_blocks(first_row, *, causal: bool, block_k: int, q_len: int, kv_len: int):
  """Leading key blocks in which every element is unmasked for every query row of the q block.

  The q block's first row is the most constrained one under (bottom-right aligned) causal masking.
  """
  full_blocks = kv_len // block_k
  if not causal:
    return jnp.int32(full_blocks)
  # Block j is fully visible to row t iff (j + 1) * block_k - 1 <= t + kv_len - q_len.
  visible = jnp.maximum(first_row + (kv_len - q_len + 1), 0)
  return jnp.minimum(lax.div(visible, jnp.int32(block_k)), full_blocks)


def _online_softmax_update(s, tile_max, v, acc, row_max, row_sum):
  """Adds one tile's P·V and row sums; s, tile_max are base-2 scaled logits of the tile."""
  new_max = jnp.maximum(row_max, tile_max)
  # Rows with no finite logit so far (masked elements, or -inf values in an unmasked tile) keep max -inf;
  # shift them by 0 so exp2 gives 0, not NaN. A [block_q] select: negligible next to the tile's work.
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  correction = jnp.exp2(row_max - shift)
  p = jnp.exp2(s - shift[:, None])
  row_sum = correction * row_sum + jnp.sum(p, axis=1)
  acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
  return acc, new_max, row_sum


def _has_nonfinite(x: jax.Array) -> jax.Array:
  """Scalar bool: whether the 2-d tile x holds a NaN or ±inf."""
  return jnp.max(jnp.max(jnp.where(jnp.isfinite(x.astype(jnp.float32)), 0.0, 1.0), axis=1)) > 0


def _block_sparse_kernel(indices_ref, counts_ref, lam_ref, tainted_ref, q_ref, k_ref, v_ref, out_ref,
                         skipped_ref, *residual_refs, causal: bool, block_q: int, block_k: int, q_len: int,
                         kv_len: int, sm_scale: float, n_q_blocks: int, max_masked_blocks: int,
                         pv_skip: bool):
  """One (q block, batch, head) program.

  indices_ref: int32 [n_k_blocks] kept key blocks of this row (ascending); counts_ref: int32 [1];
  lam_ref: f32 [1]; tainted_ref: int32 [1], 1 when a kept key block's K or V is not all finite (read
  only when pv_skip); q_ref: [block_q, head_dim]; k_ref, v_ref: [kv_len_padded, head_dim];
  out_ref: [block_q, head_dim]; skipped_ref: int32 [1]. residual_refs, for the backward pass, are
  empty or (lse_ref f32 [block_q], tile_skipped_ref int32 [n_k_blocks], written at the kept blocks).
  """
  # Reversed so that, under causal masking, the longest rows are launched first (shorter tail).
  q_block = n_q_blocks - 1 - pl.program_id(0)
  first_row = q_block * block_q
  rows = first_row + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  row_is_query = rows < q_len
  logit_scale = sm_scale * _LOG2_E
  lam_log2 = lam_ref[0] * _LOG2_E
  count = counts_ref[0]
  q = q_ref[...]
  head_dim = q.shape[-1]
  # A tainted q block (a non-finite value in q or in a kept block's K/V; `kernels.block_sparse_reference`)
  # computes every kept tile: Δ is untrustworthy there, and NaN compares differently here (Triton's max
  # ignores NaN) and in interpret mode.
  tainted = (tainted_ref[0] != 0) | _has_nonfinite(q) if pv_skip else None

  # Kept blocks needing an element mask form a suffix of the ascending list of at most
  # `max_masked_blocks` entries, so only the last few entries are inspected.
  n_unmasked_blocks = _num_unmasked_blocks(first_row, causal=causal, block_k=block_k, q_len=q_len,
                                           kv_len=kv_len)
  n_masked = jnp.int32(0)
  for back in range(1, max_masked_blocks + 1):
    position = count - back
    entry = indices_ref[jnp.maximum(position, 0)]
    n_masked += ((position >= 0) & (entry >= n_unmasked_blocks)).astype(jnp.int32)
  n_plain = count - n_masked

  def record_skip(block, skip):
    if residual_refs:
      residual_refs[1][block] = skip.astype(jnp.int32)

  def visit(position, carry, *, masked: bool):
    acc, row_max, row_sum, skipped = carry
    block = indices_ref[position]
    start = pl.multiple_of(block * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = _dot_transposed_rhs(q, k) * logit_scale
    if masked:
      cols = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
      allowed = cols[None, :] < kv_len
      if causal:
        allowed &= cols[None, :] <= rows[:, None] + (kv_len - q_len)
      s = jnp.where(allowed, s, -jnp.inf)
    tile_max = jnp.max(s, axis=1)
    update = functools.partial(_online_softmax_update, s, tile_max, v)
    if not pv_skip:
      record_skip(block, jnp.int32(0))
      return (*update(acc, row_max, row_sum), skipped)
    takes_part = row_is_query & (tile_max > -jnp.inf)
    # A row with running max -inf gains +inf: the first block a row computes is never skipped.
    gain = jnp.max(jnp.where(takes_part, tile_max - row_max, -jnp.inf))
    any_row = gain > -jnp.inf
    skip = any_row & (gain < lam_log2) & ~tainted
    acc, row_max, row_sum = lax.cond((any_row | tainted) & ~skip, update, lambda *state: state,
                                     acc, row_max, row_sum)
    record_skip(block, skip)
    return acc, row_max, row_sum, skipped + skip.astype(jnp.int32)

  carry = (jnp.zeros((block_q, head_dim), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32),
           jnp.int32(0))
  carry = lax.fori_loop(0, n_plain, functools.partial(visit, masked=False), carry)
  carry = lax.fori_loop(n_plain, count, functools.partial(visit, masked=True), carry)
  acc, row_max, row_sum, skipped = carry

  # Only an exactly empty denominator gives 0; a NaN one (non-finite inputs) stays NaN.
  empty = row_sum == 0
  out = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, row_sum)[:, None])
  out_ref[...] = out.astype(out_ref.dtype)
  skipped_ref[...] = jnp.full((1,), skipped, jnp.int32)
  if residual_refs:
    # log2-sum-exp2 of each row's computed logits; +inf on empty rows, so that exp2(s - lse) is 0 there.
    residual_refs[0][...] = jnp.where(empty, jnp.inf,
                                      row_max + jnp.log(jnp.where(empty, 1.0, row_sum)) * _LOG2_E)


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _check_inputs(q, k, v, kv_indices, kv_counts, lam, block_q: int, block_k: int) -> None:
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if k.shape != (batch, kv_len, kv_heads, head_dim) or v.shape != k.shape:
    raise ValueError(f"k and v must be [batch, kv_len, kv_heads, head_dim]={k.shape} matching "
                     f"q={q.shape}; got {k.shape=}, {v.shape=}")
  if heads % kv_heads:
    raise ValueError(f"heads must be a multiple of kv_heads; got {heads=}, {kv_heads=}")
  check_block_size("block_q", block_q)
  check_block_size("block_k", block_k)
  n_blocks = (batch, heads, pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_k))
  if kv_indices.shape != n_blocks:
    raise ValueError(f"kv_indices must be [batch, heads, n_q_blocks, n_k_blocks]={n_blocks}; "
                     f"got {kv_indices.shape}")
  if kv_counts.shape != n_blocks[:3]:
    raise ValueError(f"kv_counts must be [batch, heads, n_q_blocks]={n_blocks[:3]}; got {kv_counts.shape}")
  if lam.shape != (heads,):
    raise ValueError(f"lam must be f32 [heads]=({heads},); got shape {lam.shape}")


def _block_sparse_forward(q, k, v, kv_indices, kv_counts, lam, *, causal: bool, block_q: int,
                          block_k: int, sm_scale: float, interpret: bool, config: LaunchConfig,
                          pv_skip: bool, residuals: bool = False) -> tuple[jax.Array, ...]:
  """Pads to whole tiles, launches the kernel and crops; `pv_skip=False` compiles the λ test out.

  Returns (out, pv_skipped), plus (lse, tile_skipped) when `residuals` (see
  `block_sparse_attention_triton`).
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  n_q_blocks, n_k_blocks = kv_indices.shape[2:]
  # One pass over K and V, only where the λ test runs (without it every kept tile is computed anyway).
  tainted = (nonfinite_kept_blocks(k, v, kv_indices, kv_counts, block_k) if pv_skip
             else jnp.zeros(kv_counts.shape, jnp.int32))
  # Triton tiles need power-of-two extents: zero head_dim padding changes neither q·k nor the kept columns.
  head_dim_padded = pl.next_power_of_2(head_dim)
  q = _pad_axis(_pad_axis(q, 1, n_q_blocks * block_q), 3, head_dim_padded)
  k = _pad_axis(_pad_axis(k, 1, n_k_blocks * block_k), 3, head_dim_padded)
  v = _pad_axis(_pad_axis(v, 1, n_k_blocks * block_k), 3, head_dim_padded)

  max_masked_blocks = pl.cdiv(block_q, block_k) + 1 if causal else 1
  kernel = functools.partial(
      _block_sparse_kernel, causal=causal, block_q=block_q, block_k=block_k, q_len=q_len,
      kv_len=kv_len, sm_scale=sm_scale, n_q_blocks=n_q_blocks, max_masked_blocks=max_masked_blocks,
      pv_skip=pv_skip)

  def q_block(i):
    return n_q_blocks - 1 - i

  kv_spec = pl.BlockSpec((None, n_k_blocks * block_k, None, head_dim_padded),
                         lambda i, b, h: (b, 0, h // group, 0))
  in_specs = [
      pl.BlockSpec((None, None, None, n_k_blocks), lambda i, b, h: (b, h, q_block(i), 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, q_block(i))),
      pl.BlockSpec((1,), lambda i, b, h: (h,)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, q_block(i))),
      pl.BlockSpec((None, block_q, None, head_dim_padded), lambda i, b, h: (b, q_block(i), h, 0)),
      kv_spec,
      kv_spec,
  ]
  out_specs = [
      pl.BlockSpec((None, block_q, None, head_dim_padded), lambda i, b, h: (b, q_block(i), h, 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, q_block(i))),
  ]
  out_shape = [
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, n_q_blocks), jnp.int32),
  ]
  if residuals:
    out_specs += [
        pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i))),
        pl.BlockSpec((None, None, None, n_k_blocks), lambda i, b, h: (b, h, q_block(i), 0)),
    ]
    out_shape += [
        jax.ShapeDtypeStruct((batch, heads, n_q_blocks * block_q), jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, n_q_blocks, n_k_blocks), jnp.int32),
    ]
  outputs = pl.pallas_call(
      kernel,
      grid=(n_q_blocks, batch, heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name=f"block_sparse_attention_bq{block_q}_bk{block_k}{'_causal' if causal else ''}",
  )(kv_indices.astype(jnp.int32), kv_counts.astype(jnp.int32), lam.astype(jnp.float32), tainted, q, k, v)
  out, pv_skipped = outputs[0][:, :q_len, :, :head_dim], outputs[1]
  if not residuals:
    return out, pv_skipped
  return out, pv_skipped, outputs[2][:, :, :q_len], outputs[3]


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "sm_scale", "interpret",
                                             "num_warps", "num_stages", "return_residuals"))
def block_sparse_attention_triton(q: jax.Array, k: jax.Array, v: jax.Array, kv_indices: jax.Array,
                                  kv_counts: jax.Array, lam: jax.Array, *, causal: bool, block_q: int,
                                  block_k: int, sm_scale: float, interpret: bool = False,
                                  num_warps: int | None = None, num_stages: int | None = None,
                                  return_residuals: bool = False) -> tuple[jax.Array, ...]:
  """Block-sparse attention over kept key-block lists, with the per-head λ P·V skip.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim] (any T, S; padded here).
    kv_indices: int32 [batch, heads, n_q_blocks, n_k_blocks]; kv_counts: int32 [batch, heads,
      n_q_blocks], from `kernels.block_index.mask_to_kv_indices` of a mask already ANDed with the
      causal-valid block mask (the kernel relies on it: only the last kept blocks of a row are masked).
    lam: f32 [heads], natural-log units, <= 0; -inf never skips.
    causal: bottom-right aligned causal masking (u <= t + S - T).
    block_q, block_k: tile sizes (powers of two >= 16) the mask was built with.
    sm_scale: logit scale.
    interpret: run the kernel in Pallas interpret mode (CPU).
    num_warps, num_stages: Triton launch overrides; None takes `LaunchConfig.get_default`.
      With every λ = -inf a variant without the per-tile λ test runs where that is faster
      (`LaunchConfig.lambda_free_variant_pays`; interpret mode always runs the one with it).
    return_residuals: also return what `kernels.block_sparse_backward` needs (the forward used by
      `jax.grad`; without it the kernel is exactly the one that runs when no gradient is taken).

  Returns:
    out: [batch, T, heads, head_dim] in q.dtype (rows with nothing kept are 0; non-finite inputs
      propagate as `kernels.block_sparse_reference` documents);
    pv_skipped: int32 [batch, heads, n_q_blocks], visited blocks whose P·V was skipped;
    and, with `return_residuals`:
    lse: f32 [batch, heads, T], each row's log2-sum-exp2 of its computed logits in base-2 units
      (sm_scale·log2(e)·q·k), +inf for rows with nothing computed;
    tile_skipped: int32 [batch, heads, n_q_blocks, n_k_blocks], 1 where a kept block's P·V was skipped;
      entries of blocks that are not kept are unspecified (AND with the mask).
  """
  _check_inputs(q, k, v, kv_indices, kv_counts, lam, block_q, block_k)

  def forward(pv_skip: bool) -> Callable[..., tuple[jax.Array, ...]]:
    default = LaunchConfig.get_default(block_q, block_k, pv_skip)
    config = LaunchConfig(num_warps=num_warps or default.num_warps,
                          num_stages=num_stages or default.num_stages)
    return functools.partial(_block_sparse_forward, causal=causal, block_q=block_q, block_k=block_k,
                             sm_scale=sm_scale, interpret=interpret, config=config, pv_skip=pv_skip,
                             residuals=return_residuals)

  operands = (q, k, v, kv_indices, kv_counts, lam)
  if interpret or not LaunchConfig.lambda_free_variant_pays(block_q, block_k):
    return forward(pv_skip=True)(*operands)
  # When no head can skip (every λ = -inf), the kernel compiled without the λ test gives the same
  # results faster.
  return lax.cond(jnp.any(lam > -jnp.inf), forward(pv_skip=True), forward(pv_skip=False), *operands)
