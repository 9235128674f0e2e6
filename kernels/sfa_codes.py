"""Sparse Feature Attention over (index, value) codes, as a Pallas kernel lowered through Triton (GPU).

The FlashSFA direction of SFA (`kernels.sfa_reference` defines the semantics): queries and keys arrive as
k-sparse codes, int32 feature indices and their values ([.., k] each), so a key tile costs 2·k_k numbers
per key to read instead of head_dim. One program handles one (q block, batch, head): it decodes its query
codes into a dense [block_q, head_dim] tile once, then walks the kept key blocks of its row (the lists of
`kernels.block_index.mask_to_kv_indices`), decoding each key tile in registers and running one tensor-core
matmul for its logits, with an f32 online softmax in base 2 as in `kernels.block_sparse_triton`. The
dense [T, S] scores never exist. GQA reads kv head h // (heads // kv_heads) through the index map, so the
key codes and V are never repeated. The logits FLOPs are those of a dense tile (decoding trades IO for a
few elementwise passes; an overlap-only Θ(k²/d) tile is future work). With `return_residuals=True` it
also writes each row's base-2 log-sum-exp, which `kernels.block_sparse_backward` takes for the gradients.
`interpret=True` runs the same kernel on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels.block_config import check_block_size
# The block-sparse kernel's tile helpers: the same dots, online-softmax step, padding and launch parameters.
from kernels.block_sparse_triton import (LaunchConfig, _compiler_params, _dot_transposed_rhs,
                                         _online_softmax_update, _pad_axis)

_LOG2_E = math.log2(math.e)


def _decode(indices: jax.Array, values: jax.Array, head_dim: int) -> jax.Array:
  """Codes -> dense rows: indices int32 [rows, k], values [rows, k] -> [rows, head_dim] in values.dtype.

  Indices of one row are distinct, so each feature receives at most one value and the f32 sum is exact.
  Only 2-d selects and row reductions: what Triton lowers without trouble.
  """
  rows, k = indices.shape
  slot = lax.broadcasted_iota(jnp.int32, (rows, k), 1)
  feature = lax.broadcasted_iota(jnp.int32, (rows, head_dim), 1)
  values_f32 = values.astype(jnp.float32)

  def place(a, dense):
    in_slot = slot == a
    index = jnp.sum(jnp.where(in_slot, indices, 0), axis=1)
    value = jnp.sum(jnp.where(in_slot, values_f32, 0.0), axis=1)
    return dense + jnp.where(feature == index[:, None], value[:, None], 0.0)

  dense = lax.fori_loop(0, k, place, jnp.zeros((rows, head_dim), jnp.float32))
  return dense.astype(values.dtype)


def _sfa_codes_kernel(indices_ref, counts_ref, q_index_ref, q_value_ref, k_index_ref, k_value_ref, v_ref,
                      out_ref, *residual_refs, causal: bool, block_q: int, block_k: int, q_len: int,
                      kv_len: int, sm_scale: float, n_q_blocks: int):
  """One (q block, batch, head) program.

  indices_ref: int32 [n_k_blocks] kept key blocks of this row (ascending); counts_ref: int32 [1];
  q_index_ref, q_value_ref: [block_q, k_q_padded]; k_index_ref, k_value_ref: [kv_len_padded,
  k_k_padded]; v_ref: [kv_len_padded, head_dim_padded]; out_ref: [block_q, head_dim_padded];
  residual_refs: empty or (lse_ref f32 [block_q],).
  """
  # Reversed so that, under causal masking, the longest rows are launched first (shorter tail).
  q_block = n_q_blocks - 1 - pl.program_id(0)
  rows = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
  head_dim = v_ref.shape[-1]
  logit_scale = sm_scale * _LOG2_E
  q = _decode(q_index_ref[...], q_value_ref[...], head_dim)

  def visit(position, carry):
    block = indices_ref[position]
    start = pl.multiple_of(block * block_k, block_k)
    k = _decode(k_index_ref[pl.ds(start, block_k), :], k_value_ref[pl.ds(start, block_k), :], head_dim)
    v = v_ref[pl.ds(start, block_k), :]
    s = _dot_transposed_rhs(q, k) * logit_scale
    cols = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    allowed = cols[None, :] < kv_len
    if causal:
      allowed &= cols[None, :] <= rows[:, None] + (kv_len - q_len)
    s = jnp.where(allowed, s, -jnp.inf)
    return _online_softmax_update(s, jnp.max(s, axis=1), v, *carry)

  carry = (jnp.zeros((block_q, head_dim), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  acc, row_max, row_sum = lax.fori_loop(0, counts_ref[0], visit, carry)
  empty = row_sum == 0
  out = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, row_sum)[:, None])
  out_ref[...] = out.astype(out_ref.dtype)
  if residual_refs:
    # log2-sum-exp2 of each row's logits; +inf on empty rows, so that exp2(s - lse) is 0 there.
    residual_refs[0][...] = jnp.where(empty, jnp.inf,
                                      row_max + jnp.log(jnp.where(empty, 1.0, row_sum)) * _LOG2_E)


def _check_inputs(q_codes, k_codes, v, kv_indices, kv_counts, block_q: int, block_k: int) -> None:
  (q_index, q_value), (k_index, k_value) = q_codes, k_codes
  batch, q_len, heads, _ = q_index.shape
  _, kv_len, kv_heads, head_dim = v.shape
  if q_value.shape != q_index.shape or k_value.shape != k_index.shape:
    raise ValueError(f"code values must have their indices' shapes; got {q_index.shape=}, "
                     f"{q_value.shape=}, {k_index.shape=}, {k_value.shape=}")
  if k_index.shape[:3] != (batch, kv_len, kv_heads) or v.shape[0] != batch:
    raise ValueError(f"k codes must be [batch, S, kv_heads, k_k] and v [batch, S, kv_heads, head_dim] "
                     f"matching q codes {q_index.shape}; got {k_index.shape=}, {v.shape=}")
  if heads % kv_heads:
    raise ValueError(f"heads must be a multiple of kv_heads; got {heads=}, {kv_heads=}")
  if max(q_index.shape[-1], k_index.shape[-1]) > head_dim:
    raise ValueError(f"codes keep at most head_dim={head_dim} features; got k_q={q_index.shape[-1]}, "
                     f"k_k={k_index.shape[-1]}")
  check_block_size("block_q", block_q)
  check_block_size("block_k", block_k)
  n_blocks = (batch, heads, pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_k))
  if kv_indices.shape != n_blocks or kv_counts.shape != n_blocks[:3]:
    raise ValueError(f"kv_indices must be {n_blocks} and kv_counts {n_blocks[:3]}; got "
                     f"{kv_indices.shape}, {kv_counts.shape}")


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "sm_scale", "interpret",
                                             "num_warps", "num_stages", "return_residuals"))
def sfa_codes_attention_triton(q_codes: tuple[jax.Array, jax.Array], k_codes: tuple[jax.Array, jax.Array],
                               v: jax.Array, kv_indices: jax.Array, kv_counts: jax.Array, *, causal: bool,
                               block_q: int, block_k: int, sm_scale: float, interpret: bool = False,
                               num_warps: int | None = None, num_stages: int | None = None,
                               return_residuals: bool = False) -> tuple[jax.Array, ...]:
  """Softmax attention of k-sparse query codes over k-sparse key codes, over kept key-block lists.

  Args:
    q_codes: (indices int32 [batch, T, heads, k_q], values [batch, T, heads, k_q]), from
      `kernels.sfa_reference.top_k_codes`; indices of one row distinct and < head_dim.
    k_codes: (indices int32 [batch, S, kv_heads, k_k], values [batch, S, kv_heads, k_k]).
    v: [batch, S, kv_heads, head_dim], in the code values' dtype.
    kv_indices: int32 [batch, heads, n_q_blocks, n_k_blocks]; kv_counts: int32 [batch, heads,
      n_q_blocks], from `kernels.block_index.mask_to_kv_indices` (of any mask; causal masking is applied
      per element here).
    causal: bottom-right aligned causal masking (u <= t + S - T).
    block_q, block_k: tile sizes (powers of two >= 16) the lists were built with.
    sm_scale: logit scale.
    interpret: run the kernel in Pallas interpret mode (CPU).
    num_warps, num_stages: Triton launch overrides; None takes `LaunchConfig.get_default`.
    return_residuals: also return the per-row log-sum-exp for `kernels.block_sparse_backward`.

  Returns:
    (out,) or (out, lse): out [batch, T, heads, head_dim] in v.dtype, rows with nothing kept 0; lse f32
    [batch, heads, T], base-2 (sm_scale·log2(e)·q·k units), +inf for rows with nothing computed.
  """
  _check_inputs(q_codes, k_codes, v, kv_indices, kv_counts, block_q, block_k)
  (q_index, q_value), (k_index, k_value) = q_codes, k_codes
  batch, q_len, heads, _ = q_index.shape
  _, kv_len, kv_heads, head_dim = v.shape
  group = heads // kv_heads
  n_q_blocks, n_k_blocks = kv_indices.shape[2:]
  # Triton tiles need power-of-two extents. Padded code slots hold (index 0, value 0): they add nothing.
  q_slots, k_slots = pl.next_power_of_2(q_index.shape[-1]), pl.next_power_of_2(k_index.shape[-1])
  pad_q = lambda x: _pad_axis(_pad_axis(x, 1, n_q_blocks * block_q), 3, q_slots)
  pad_k = lambda x: _pad_axis(_pad_axis(x, 1, n_k_blocks * block_k), 3, k_slots)
  q_index, q_value, k_index, k_value = pad_q(q_index), pad_q(q_value), pad_k(k_index), pad_k(k_value)
  head_dim_padded = pl.next_power_of_2(head_dim)
  v = _pad_axis(_pad_axis(v, 1, n_k_blocks * block_k), 3, head_dim_padded)

  def q_block(i):
    return n_q_blocks - 1 - i

  q_spec = pl.BlockSpec((None, block_q, None, q_slots), lambda i, b, h: (b, q_block(i), h, 0))
  k_spec = pl.BlockSpec((None, n_k_blocks * block_k, None, k_slots), lambda i, b, h: (b, 0, h // group, 0))
  in_specs = [
      pl.BlockSpec((None, None, None, n_k_blocks), lambda i, b, h: (b, h, q_block(i), 0)),
      pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, q_block(i))),
      q_spec, q_spec, k_spec, k_spec,
      pl.BlockSpec((None, n_k_blocks * block_k, None, head_dim_padded), lambda i, b, h: (b, 0, h // group, 0)),
  ]
  out_specs = [pl.BlockSpec((None, block_q, None, head_dim_padded), lambda i, b, h: (b, q_block(i), h, 0))]
  out_shape = [jax.ShapeDtypeStruct((batch, n_q_blocks * block_q, heads, head_dim_padded), v.dtype)]
  if return_residuals:
    out_specs.append(pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i))))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, n_q_blocks * block_q), jnp.float32))
  default = LaunchConfig.get_default(block_q, block_k, pv_skip=False)
  config = LaunchConfig(num_warps=num_warps or default.num_warps, num_stages=num_stages or default.num_stages)
  kernel = functools.partial(_sfa_codes_kernel, causal=causal, block_q=block_q, block_k=block_k,
                             q_len=q_len, kv_len=kv_len, sm_scale=sm_scale, n_q_blocks=n_q_blocks)
  outputs = pl.pallas_call(
      kernel,
      grid=(n_q_blocks, batch, heads),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name=f"sfa_codes_attention_bq{block_q}_bk{block_k}{'_causal' if causal else ''}",
  )(kv_indices.astype(jnp.int32), kv_counts.astype(jnp.int32), q_index.astype(jnp.int32), q_value,
    k_index.astype(jnp.int32), k_value, v)
  out = outputs[0][:, :q_len, :, :head_dim]
  return (out,) if not return_residuals else (out, outputs[1][:, :, :q_len])
