"""Gradients of block-sparse attention as Pallas kernels in FlashAttention-2 style (Triton on GPU).

The forward (`kernels.block_sparse_triton` with `return_residuals=True`) saves each row's log-sum-exp and
which kept tiles it P·V-skipped. Only the tiles it computed have a gradient: the block mask and the skip
decisions are constants for differentiation, as in the VJP of `kernels.block_sparse_reference`, which
defines what is correct (λ and the mask get no gradient). Two kernels recompute the probabilities tile by
tile. `dq` walks, per (q block, batch, head), the computed key blocks of its row. `dk/dv` walks, per (key
block, batch, kv head), the (query head, q block) pairs that computed that key block: the transposed lists
of `kernels.block_index.mask_to_q_indices`. The query heads of a GQA group are thus summed in registers
and K/V are never repeated in memory. Logits are in base 2 as in the forward; accumulation is f32 for every
input dtype. Rows with nothing computed get a zero gradient, and elements outside the causal/ragged region
contribute exactly nothing (their 0·NaN products are masked, not summed). `interpret=True` runs both
kernels on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels.block_index import mask_to_kv_indices, mask_to_q_indices
# The forward's tile helpers: the same dots (f32 accumulation, f32 inputs kept out of TF32), padding and
# Triton launch parameters.
from kernels.block_sparse_triton import LaunchConfig, _compiler_params, _dot, _dot_transposed_rhs, _pad_axis

_LOG2_E = math.log2(math.e)


def _dot_transposed_lhs(a: jax.Array, b: jax.Array) -> jax.Array:
  """a: [m, k], b: [m, n] -> a.T @ b in f32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def default_launch_config(block_q: int, block_k: int) -> LaunchConfig:
  """Untuned: the backward holds two more f32 tiles than the forward, so 8 warps once a side reaches 128."""
  return LaunchConfig(num_warps=8 if max(block_q, block_k) >= 128 else 4, num_stages=2)


def _tile_needs_mask(q_block, k_block, *, causal: bool, block_q: int, block_k: int, q_len: int,
                     kv_len: int):
  """Scalar bool: whether any element of tile (q_block, k_block) is padding or causally hidden."""
  inside = ((q_block + 1) * block_q <= q_len) & ((k_block + 1) * block_k <= kv_len)
  if causal:
    # The tile's first row and last column form the element that causal masking hides first.
    inside &= (k_block + 1) * block_k - 1 <= q_block * block_q + (kv_len - q_len)
  return jnp.logical_not(inside)


def _tile_gradients(q, k, v, d_out, lse, delta, q_block, k_block, *, masked: bool, causal: bool,
                    block_q: int, block_k: int, q_len: int, kv_len: int, sm_scale: float):
  """Probabilities p and logit gradients ds = p (dO·v − D) of one tile, f32 [block_q, block_k].

  q, d_out: [block_q, head_dim]; k, v: [block_k, head_dim]; lse: f32 [block_q] (base 2, +inf on rows
  with nothing computed); delta: f32 [block_q], D = rowsum(dO ∘ O). ds is in natural-log units of the
  scaled logits, so dq = sm_scale · ds @ k and dk = sm_scale · dsᵀ @ q.
  """
  p = jnp.exp2(_dot_transposed_rhs(q, k) * (sm_scale * _LOG2_E) - lse[:, None])
  ds = p * (_dot_transposed_rhs(d_out, v) - delta[:, None])
  if masked:
    rows = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    cols = k_block * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    allowed = (rows < q_len) & (cols < kv_len)
    if causal:
      allowed &= cols <= rows + (kv_len - q_len)
    p = jnp.where(allowed, p, 0.0)
    ds = jnp.where(allowed, ds, 0.0)
  return p, ds


def _dq_kernel(indices_ref, counts_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref, *,
               n_q_blocks: int, **tile):
  """One (q block, batch, head) program: dq over the computed key blocks of its row.

  indices_ref: int32 [n_k_blocks]; counts_ref: int32 [1]; q_ref, d_out_ref, dq_ref: [block_q, head_dim];
  k_ref, v_ref: [kv_len_padded, head_dim]; lse_ref, delta_ref: f32 [block_q].
  """
  # Reversed, as in the forward: under causal masking the longest rows are launched first.
  q_block = n_q_blocks - 1 - pl.program_id(0)
  block_k = tile["block_k"]
  q, d_out, lse, delta = q_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...]

  def visit(position, dq):
    k_block = indices_ref[position]
    start = pl.multiple_of(k_block * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]

    def add(masked: bool):
      _, ds = _tile_gradients(q, k, v, d_out, lse, delta, q_block, k_block, masked=masked, **tile)
      return dq + _dot(ds.astype(k.dtype), k)

    return lax.cond(_tile_needs_mask(q_block, k_block, **_geometry(tile)),
                    functools.partial(add, True), functools.partial(add, False))

  dq = lax.fori_loop(0, counts_ref[0], visit, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * tile["sm_scale"]).astype(dq_ref.dtype)


def _dkv_kernel(indices_ref, counts_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, n_q_blocks: int, **tile):
  """One (key block, batch, kv head) program: dk, dv summed over the group's heads that computed it.

  indices_ref: int32 [group * n_q_blocks] (entries g * n_q_blocks + i); counts_ref: int32 [1];
  q_ref, d_out_ref: [q_len_padded, group, head_dim]; k_ref, v_ref, dk_ref, dv_ref: [block_k, head_dim];
  lse_ref, delta_ref: f32 [group, q_len_padded].
  """
  k_block = pl.program_id(0)
  block_q = tile["block_q"]
  k, v = k_ref[...], v_ref[...]

  def visit(position, carry):
    dk, dv = carry
    entry = indices_ref[position]
    member = lax.div(entry, jnp.int32(n_q_blocks))
    q_block = entry - member * n_q_blocks
    start = pl.multiple_of(q_block * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), member, :]
    d_out = d_out_ref[pl.ds(start, block_q), member, :]
    lse = lse_ref[member, pl.ds(start, block_q)]
    delta = delta_ref[member, pl.ds(start, block_q)]

    def add(masked: bool):
      p, ds = _tile_gradients(q, k, v, d_out, lse, delta, q_block, k_block, masked=masked, **tile)
      return dk + _dot_transposed_lhs(ds.astype(q.dtype), q), dv + _dot_transposed_lhs(p.astype(d_out.dtype),
                                                                                          d_out)

    return lax.cond(_tile_needs_mask(q_block, k_block, **_geometry(tile)),
                    functools.partial(add, True), functools.partial(add, False))

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, counts_ref[0], visit, (zeros, zeros))
  dk_ref[...] = (dk * tile["sm_scale"]).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _geometry(tile: dict) -> dict:
  return {name: tile[name] for name in ("causal", "block_q", "block_k", "q_len", "kv_len")}


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "sm_scale", "interpret",
                                             "num_warps", "num_stages"))
def block_sparse_backward_triton(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
                                 d_out: jax.Array, computed: jax.Array, *, causal: bool, block_q: int,
                                 block_k: int, sm_scale: float, interpret: bool = False,
                                 num_warps: int | None = None, num_stages: int | None = None
                                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dq, dk, dv of block-sparse attention, given what the forward saved.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim]; all one dtype.
    out: the forward's output [batch, T, heads, head_dim]; d_out: its cotangent, same shape.
    lse: f32 [batch, heads, T], the forward's base-2 log-sum-exp (`return_residuals=True`).
    computed: bool [batch, heads, n_q_blocks, n_k_blocks], the kept blocks whose P·V the forward ran
      (the causal-ANDed mask without its skipped tiles).
    causal, block_q, block_k, sm_scale: as in the forward.
    interpret: run both kernels in Pallas interpret mode (CPU).
    num_warps, num_stages: Triton launch overrides; None takes `default_launch_config`.

  Returns:
    dq [batch, T, heads, head_dim], dk and dv [batch, S, kv_heads, head_dim], in the input dtypes.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  n_q_blocks, n_k_blocks = computed.shape[2:]
  q_len_padded, kv_len_padded = n_q_blocks * block_q, n_k_blocks * block_k
  head_dim_padded = pl.next_power_of_2(head_dim)
  # D_i = dO_i · O_i, the softmax-Jacobian term every tile of row i shares (elementwise: no TF32 dot).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  pad_q = lambda x: _pad_axis(_pad_axis(x, 1, q_len_padded), 3, head_dim_padded)
  pad_kv = lambda x: _pad_axis(_pad_axis(x, 1, kv_len_padded), 3, head_dim_padded)
  q_p, d_out_p, k_p, v_p = pad_q(q), pad_q(d_out.astype(q.dtype)), pad_kv(k), pad_kv(v)
  lse_p, delta_p = (_pad_axis(x.astype(jnp.float32), 2, q_len_padded) for x in (lse, delta))

  default = default_launch_config(block_q, block_k)
  params = _compiler_params(LaunchConfig(num_warps=num_warps or default.num_warps,
                                         num_stages=num_stages or default.num_stages))
  tile = dict(causal=causal, block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len,
              sm_scale=sm_scale, n_q_blocks=n_q_blocks)
  name = f"bq{block_q}_bk{block_k}{'_causal' if causal else ''}"

  kv_indices, kv_counts = mask_to_kv_indices(computed)

  def q_block(i):
    return n_q_blocks - 1 - i

  q_spec = pl.BlockSpec((None, block_q, None, head_dim_padded), lambda i, b, h: (b, q_block(i), h, 0))
  kv_spec = pl.BlockSpec((None, kv_len_padded, None, head_dim_padded), lambda i, b, h: (b, 0, h // group, 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, q_block(i)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **tile),
      grid=(n_q_blocks, batch, heads),
      in_specs=[
          pl.BlockSpec((None, None, None, n_k_blocks), lambda i, b, h: (b, h, q_block(i), 0)),
          pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, q_block(i))),
          q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
      ],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name=f"block_sparse_dq_{name}",
  )(kv_indices, kv_counts, q_p, k_p, v_p, d_out_p, lse_p, delta_p)

  q_indices, q_counts = mask_to_q_indices(computed, kv_heads)
  group_spec = pl.BlockSpec((None, q_len_padded, group, head_dim_padded), lambda j, b, c: (b, 0, c, 0))
  group_rows_spec = pl.BlockSpec((None, group, q_len_padded), lambda j, b, c: (b, c, 0))
  key_spec = pl.BlockSpec((None, block_k, None, head_dim_padded), lambda j, b, c: (b, j, c, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **tile),
      grid=(n_k_blocks, batch, kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, None, group * n_q_blocks), lambda j, b, c: (b, c, j, 0)),
          pl.BlockSpec((None, None, 1), lambda j, b, c: (b, c, j)),
          group_spec, key_spec, key_spec, group_spec, group_rows_spec, group_rows_spec,
      ],
      out_specs=[key_spec, key_spec],
      out_shape=[jax.ShapeDtypeStruct(k_p.shape, k.dtype), jax.ShapeDtypeStruct(v_p.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name=f"block_sparse_dkv_{name}",
  )(q_indices, q_counts, q_p, k_p, v_p, d_out_p, lse_p, delta_p)
  return (dq[:, :q_len, :, :head_dim], dk[:, :kv_len, :, :head_dim], dv[:, :kv_len, :, :head_dim])
