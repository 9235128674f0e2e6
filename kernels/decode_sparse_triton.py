"""Decode-phase block-sparse attention as a Pallas kernel lowered through Triton (GPU; `interpret=True` on CPU).

One program handles one (batch, query head): it walks that head's kept key blocks of the cache (the lists of
`kernels.decode_select_triton.select_lists_triton` or `kernels.decode_sparse_reference.select_block_lists`:
kept blocks first, in any order), loading only those [block_size, head_dim]
slices of K and V, with an f32 online softmax (base-2 exponent, log2(e) folded into the logit scale) over
the chunk's T <= block_size queries, padded to a power-of-two tile of at least 16 rows (Triton's smallest
dot). Query row t sits at position length − T + t and sees key u iff u <= that position; the element
mask is applied to every visited block (a [rows, block_size] select, small next to a decode step's loads),
and V slots past the length are zeroed, so whatever the cache holds there (NaN included) never reaches
the output.
GQA reads kv head h // (heads // kv_heads) through the index map, so K and V are never repeated; the query
heads of one kv group run in separate programs because each keeps its own blocks (a program per kv group
would walk the union of their lists). With `num_splits` > 1 (split-K, as in flash-decoding) each (batch,
head) runs that many programs over contiguous shares of its list, which fills the GPU at batch 1 where a
9-head model would otherwise run 9 programs; each returns its unnormalised accumulator with its row max
and sum, merged in f32 outside the kernel. `kernels.decode_sparse_reference` defines the semantics.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from kernels.block_sparse_triton import _pad_axis

_LOG2_E = math.log2(math.e)
_MIN_ROWS = 16   # Triton's smallest dot operand extent


def _compiler_params(num_warps: int, num_stages: int):
  # The Triton params class was renamed between JAX releases (TritonCompilerParams -> CompilerParams).
  params_class = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return params_class(num_warps=num_warps, num_stages=num_stages)


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
  """a: [m, k] times b ([n, k] when contract_b == 1, [k, n] when 0), in f32."""
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def attend_block(carry: tuple[jax.Array, jax.Array, jax.Array], block: jax.Array, *, q: jax.Array, k_ref, v_ref,
                 length: jax.Array, positions: jax.Array, logit_scale: float,
                 block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One key block of the online softmax: carry (acc f32 [rows, head_dim], row max in log2 units [rows],
  row sum [rows]) updated with the block's keys and values (k_ref, v_ref: [max_len, head_dim], only
  this block's slices loaded). Query row r sits at positions[r] and sees key u iff u <= positions[r]."""
  acc, row_max, row_sum = carry
  start = pl.multiple_of(block * block_size, block_size)
  k = k_ref[pl.ds(start, block_size), :]
  v = v_ref[pl.ds(start, block_size), :]
  cols = start + lax.broadcasted_iota(jnp.int32, (block_size,), 0)
  # Slots past the length may hold anything (NaN included); P is 0 there, but 0 * NaN is not 0.
  v = jnp.where((cols < length)[:, None], v, jnp.zeros_like(v))
  s = jnp.where(cols[None, :] <= positions[:, None], _dot(q, k, 1) * logit_scale, -jnp.inf)
  new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
  # A row with no visible key yet keeps max -inf; shift it by 0 so exp2 gives 0, not NaN.
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  correction = jnp.exp2(row_max - shift)
  p = jnp.exp2(s - shift[:, None])
  row_sum = correction * row_sum + jnp.sum(p, axis=1)
  acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v, 0)
  return acc, new_max, row_sum


def query_positions(rows: int, q_len: int, length: jax.Array) -> jax.Array:
  """int32 [rows]: each padded query row's position; padding rows take the last query's, so no row is
  empty (their output is cropped)."""
  return length - q_len + jnp.minimum(lax.broadcasted_iota(jnp.int32, (rows,), 0), q_len - 1)


def empty_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The online softmax before any block: acc 0, row max −inf, row sum 0."""
  return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def split_range(total: jax.Array, num_splits: int) -> tuple[jax.Array, jax.Array]:
  """[first, last) of this program's contiguous share of `total` items (split index: grid axis 2); all of
  them with one split."""
  if num_splits == 1:
    return 0, total
  share = (total + num_splits - 1) // num_splits
  first = pl.program_id(2) * share
  return first, jnp.minimum(first + share, total)


def finish(state: tuple[jax.Array, jax.Array, jax.Array], out_ref, stats_refs, num_splits: int) -> None:
  """Writes a program's online-softmax state: normalised (a row that saw no key outputs 0) with one
  split, else the unnormalised accumulator to out_ref and its row max and sum to stats_refs."""
  acc, row_max, row_sum = state
  if num_splits == 1:
    empty = row_sum == 0
    out = jnp.where(empty[:, None], 0.0, acc / jnp.where(empty, 1.0, row_sum)[:, None])
    out_ref[...] = out.astype(out_ref.dtype)
    return
  max_ref, sum_ref = stats_refs
  out_ref[...] = acc
  max_ref[...] = row_max
  sum_ref[...] = row_sum


def _decode_kernel(indices_ref, counts_ref, lengths_ref, q_ref, k_ref, v_ref, out_ref, *stats_refs, q_len: int,
                   block_size: int, sm_scale: float, num_splits: int):
  """One (batch, head, split) program.

  indices_ref: int32 [n_blocks], the kept blocks first (any order); counts_ref: int32 [1]; lengths_ref:
  int32 [1]; q_ref: [rows, head_dim] (rows >= q_len, padding rows cropped by the caller);
  k_ref, v_ref: [max_len, head_dim], the whole cache of the kv head (only kept slices are loaded).
  With one split, out_ref [rows, head_dim] gets the normalised output. With more, the program walks its
  contiguous share of the kept list and writes the unnormalised f32 accumulator to out_ref and its row
  max (log2 units) and row sum to stats_refs ([rows] each), merged by the caller.
  """
  rows = q_ref.shape[0]
  length = lengths_ref[0]
  q = q_ref[...]
  attend = functools.partial(attend_block, q=q, k_ref=k_ref, v_ref=v_ref, length=length,
                             positions=query_positions(rows, q_len, length), logit_scale=sm_scale * _LOG2_E,
                             block_size=block_size)
  visit = lambda position, carry: attend(carry, indices_ref[position])
  first, last = split_range(counts_ref[0], num_splits)
  finish(lax.fori_loop(first, last, visit, empty_state(rows, q.shape[-1])), out_ref, stats_refs, num_splits)


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "interpret", "num_warps",
                                             "num_stages", "num_splits"))
def decode_sparse_attention_triton(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                                   kv_indices: jax.Array, kv_counts: jax.Array, *, block_size: int,
                                   sm_scale: float, interpret: bool = False, num_warps: int = 4,
                                   num_stages: int = 2, num_splits: int = 1) -> jax.Array:
  """Attention of a query chunk over the kept blocks of a KV cache (unchecked: `kernels.decode_sparse`).

  Args:
    q: [batch, T, heads, head_dim], T <= block_size, at positions lengths − T … lengths − 1.
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim], max_len a multiple of block_size.
    lengths: int32 [batch], filled slots per sequence (>= T).
    kv_indices: int32 [batch, heads, n_blocks] whose first kv_counts entries are the kept blocks, in any
      order (`select_block_lists`, or `mask_to_kv_indices` of a mask with a unit q-block axis); the
      other entries must lie in [0, n_blocks).
    kv_counts: int32 [batch, heads].
    block_size: slots per block, a power of two >= 16; sm_scale: the logit scale.
    interpret: Pallas interpret mode (CPU). num_warps, num_stages: Triton launch settings.
    num_splits: programs per (batch, head), each over a contiguous share of its kept list (split-K),
      their partial softmax states merged here in f32; 1 normalises in the kernel.

  Returns:
    [batch, T, heads, head_dim] in q.dtype.
  """
  batch, q_len, heads, head_dim = q.shape
  n_blocks = k_cache.shape[1] // block_size
  dtype = q.dtype
  q, k_cache, v_cache, q_spec, kv_spec = grid_inputs(q, k_cache, v_cache)
  in_specs = [
      pl.BlockSpec((None, None, n_blocks), lambda b, h, s: (b, h, 0)),
      pl.BlockSpec((None, None, 1), lambda b, h, s: (b, h, 0)),
      pl.BlockSpec((1,), lambda b, h, s: (b,)),
      q_spec,
      kv_spec,
      kv_spec,
  ]
  out_specs, out_shape = attention_outputs(q, q_spec, num_splits)
  result = pl.pallas_call(
      functools.partial(_decode_kernel, q_len=q_len, block_size=block_size, sm_scale=sm_scale,
                        num_splits=num_splits),
      grid=(batch, heads, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name=f"decode_sparse_attention_b{block_size}" + (f"_split{num_splits}" if num_splits > 1 else ""),
  )(kv_indices.astype(jnp.int32), kv_counts.astype(jnp.int32)[..., None], lengths.astype(jnp.int32), q,
    k_cache, v_cache)
  return attention_result(result, num_splits, q_len=q_len, head_dim=head_dim, dtype=dtype)


def grid_inputs(q: jax.Array, k_cache: jax.Array,
                v_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, pl.BlockSpec, pl.BlockSpec]:
  """q [batch, T, heads, head_dim] and the caches [batch, max_len, kv_heads, head_dim] padded for a
  (batch, head, split) decode grid, with their BlockSpecs: q's rows to a power of two >= 16 (Triton's
  smallest dot), head_dim to a power of two; each program sees its head's [rows, width] queries and its kv
  head's whole [max_len, width] cache (GQA through the index map, K and V never repeated)."""
  _, q_len, heads, head_dim = q.shape
  max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = heads // kv_heads
  rows = max(_MIN_ROWS, pl.next_power_of_2(q_len))
  # Triton tiles need power-of-two extents: zero head_dim padding changes neither q·k nor P·V. (A real
  # model's head_dim, 64 or 128, needs none, so the cache is not copied.)
  width = pl.next_power_of_2(head_dim)
  q = _pad_axis(_pad_axis(q, 1, rows), 3, width)
  k_cache, v_cache = (_pad_axis(x, 3, width) for x in (k_cache, v_cache))
  kv_spec = pl.BlockSpec((None, max_len, None, width), lambda b, h, s: (b, 0, h // group, 0))
  q_spec = pl.BlockSpec((None, rows, None, width), lambda b, h, s: (b, 0, h, 0))
  return q, k_cache, v_cache, q_spec, kv_spec


def attention_result(parts: list[jax.Array], num_splits: int, *, q_len: int, head_dim: int,
                     dtype: jnp.dtype) -> jax.Array:
  """The attention outputs of a (batch, head, split) grid (`attention_outputs`' order) as [batch, q_len,
  heads, head_dim] in dtype: cropped, and with splits merged first (`_merge_splits`)."""
  if num_splits == 1:
    return parts[0][:, :q_len, :, :head_dim]
  return _merge_splits(*parts)[:, :q_len, :, :head_dim].astype(dtype)


def split_part(*tail: int) -> pl.BlockSpec:
  """The block of one (batch, head, split) program in an output [batch, heads, splits, *tail]."""
  return pl.BlockSpec((None, None, None) + tail, lambda b, h, s: (b, h, s) + (0,) * len(tail))


def attention_outputs(q: jax.Array, q_spec: pl.BlockSpec, num_splits: int) -> tuple[list, list]:
  """(out_specs, out_shapes) of a (batch, head, split) decode grid's attention, q: [batch, rows, heads,
  width] padded: with one split the normalised output shaped like q; with more, per split the f32
  accumulator [rows, width], row max and row sum [rows] (`_merge_splits`)."""
  batch, rows, heads, width = q.shape
  if num_splits == 1:
    return [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  shape = lambda *tail: jax.ShapeDtypeStruct((batch, heads, num_splits) + tail, jnp.float32)
  return ([split_part(rows, width), split_part(rows), split_part(rows)],
          [shape(rows, width), shape(rows), shape(rows)])


def _merge_splits(acc: jax.Array, row_max: jax.Array, row_sum: jax.Array) -> jax.Array:
  """Split-K partial states -> attention output [batch, rows, heads, width] in f32.

  acc: f32 [batch, heads, splits, rows, width] (unnormalised P·V); row_max (log2 units), row_sum: f32
  [batch, heads, splits, rows]. An empty split (max −inf, sum 0) weighs 0; a row with no visible key
  anywhere outputs 0, as the one-program kernel does.
  """
  top = jnp.max(row_max, axis=2, keepdims=True)
  weight = jnp.exp2(row_max - jnp.where(top == -jnp.inf, 0.0, top))              # 0 for empty splits
  total = jnp.sum(weight * row_sum, axis=2)                                        # [B, H, rows]
  out = jnp.sum(weight[..., None] * acc, axis=2)                                   # [B, H, rows, width]
  out = jnp.where((total == 0)[..., None], 0.0, out / jnp.where(total == 0, 1.0, total)[..., None])
  return out.transpose(0, 2, 1, 3)
