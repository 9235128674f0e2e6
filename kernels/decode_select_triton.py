"""Decode-phase block selection without a sort, as Pallas kernels (Triton on GPU; `interpret=True` on CPU):
`selection="pallas_lists"` (the default) and `selection="in_kernel"` of `kernels.decode_sparse`.

Why: the XLA path (`select_block_lists`) ranks the candidates with one sort and a dozen small XLA operations
around it (`benchmarks.decode_bench` counts them per call); at decode sizes each costs a launch, and on
SmolLM2 at 8K on an H200 the selection alone took about as long as dense attention over the whole cache.
Here one program per (batch, head) takes its head's block scores (q̄ · k̄_j · sm_scale, one XLA product
outside: `kernels.decode_sparse_reference.block_scores`) and decides which blocks it keeps without
sorting. `select_lists_triton` writes them as lists (kept blocks first, ascending: a cumulative sum per
group and one scatter) for `kernels.decode_sparse_triton` to walk; `decode_select_attention_triton`
instead walks the cache inside the same program, in block order, reading K and V of the kept blocks only.

Keeping without a sort. A candidate block j (valid, not forced) is kept under τ iff the candidates'
softmax mass of the blocks scoring strictly above it is < τ (top-p), and under top-k iff fewer than k
candidates score strictly above it. Both "mass (count) above t" are non-increasing in t, so the kept
candidates are those scoring at least one threshold, found by bisection over the scores' order-preserving
int32 keys (the f32 bits, negatives' magnitude bits flipped): 32 halvings of the key range, each a masked
sum over the head's [n_blocks] scores. The walk then decides block j from scores_ref[j], the very value
the threshold was found on. The forced blocks (the chunk's, and block 0 with `sink`) are always kept; τ
>= 1 keeps every valid block.

Against the list path's rule (`kernels.decode_sparse_reference`), the kept blocks are the same except
(1) blocks whose scores tie exactly: the sort keeps them by index until the budget is spent, here they
are kept or dropped together; and (2) where a candidate's mass above lands within f32 rounding of τ: the
sort path sums the masses in rank order, here a masked sum in another order. In the fused kernel, split-K
(`num_splits` > 1) cuts the block range, not the kept list, into contiguous shares; each program decides the whole row
(the bisection is cheap), walks its share and returns its partial softmax state, merged by the caller
as the list kernel's are.

Measured (`python -m benchmarks.decode_bench`, H200, `results/decode_bench.md`, one run): the listing kernel
then the list kernel decoded fastest of the three selections in 10 of 12 settings (Llama-2-7B shape at 32K,
batch 1, top-k at 0.9 sparsity: 164 tokens/s against the XLA sort's 153 and the fused kernel's 103), within
2 % of the sort in the other two. The fused kernel has the fewest operations per call (SmolLM2, batch 1: 6
against 7 and 11) but is the slowest: one layer alone, its time grows with the kept blocks far faster than the list
kernel's (88 / 130 / 216 µs at 49 / 126 / 254 kept blocks of 512, against 50 / 79 / 137 for the same lists
written by the listing kernel): its branch per cached block likely keeps Triton from software-pipelining
the K/V loads that the list kernel's loop over kept indices gets (not profiled). Hence "in_kernel" is
opt-in and "pallas_lists" the default.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels.block_sparse_triton import _pad_axis
from kernels.decode_sparse_reference import block_roles
from kernels.decode_sparse_triton import (_LOG2_E, _compiler_params, attend_block, attention_outputs,
                                          attention_result, empty_state, finish, grid_inputs, query_positions,
                                          split_part, split_range)

SELECTION_RULES = ("tau", "top_k")
_BISECTION_STEPS = 32   # halvings that shrink any int32 key range to adjacent keys


def order_keys(x: jax.Array) -> jax.Array:
  """int32 keys in the order of the f32 values `x` (finite or ±inf): non-negative floats keep their bits,
  negative ones flip their magnitude bits, so a more negative value gets a smaller key."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _midpoint(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """floor((lo + hi) / 2) of int32s without overflow."""
  return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


def kept_threshold(keys: jax.Array, candidate: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
  """The smallest key t with Σ weights[candidate & keys > t] < target: a candidate j is kept iff
  keys[j] >= t. keys int32 [n], candidate bool [n], weights [n] >= 0 (f32 masses or int32 ones), target a
  scalar > 0 of weights' dtype. Bisection: lo always has the sum >= target (or lies below every key),
  hi always below it."""
  above = lambda t: jnp.sum(jnp.where(candidate & (keys > t), weights, jnp.zeros_like(weights)))
  lo = jnp.min(jnp.where(candidate, keys, jnp.int32(0x7FFFFFFF))) - 1
  hi = jnp.max(jnp.where(candidate, keys, lo + 1))

  def halve(_, bounds):
    lo, hi = bounds
    mid = _midpoint(lo, hi)
    below = above(mid) < target
    return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

  return lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, hi))[1]


def _kept_blocks(budget_ref, lengths_ref, scores_ref, *, rule: str, q_len: int, block_size: int, sink: bool):
  """The selection of one (batch, head): (kept bool [n_pad], keeps), keeps(block) deciding one block from
  scores_ref[block] against the same threshold (the fused kernel's walk)."""
  n_pad = scores_ref.shape[0]
  roles = functools.partial(block_roles, lengths=lengths_ref[0], q_len=q_len, block_size=block_size, sink=sink)
  _, forced, candidate = roles(lax.broadcasted_iota(jnp.int32, (n_pad,), 0))
  scores = scores_ref[...]
  keys = order_keys(scores)
  budget = budget_ref[0]
  if rule == "tau":
    top = jnp.max(jnp.where(candidate, scores, -jnp.inf))
    weights = jnp.where(candidate, jnp.exp(scores - jnp.where(top == -jnp.inf, 0.0, top)), 0.0)
    threshold = kept_threshold(keys, candidate, weights, budget * jnp.sum(weights))
    keep_all = budget >= 1.0
  else:
    threshold = kept_threshold(keys, candidate, candidate.astype(jnp.int32), budget)
    keep_all = False

  def keeps(block):
    _, forced_j, candidate_j = roles(block)
    return forced_j | (candidate_j & ((order_keys(scores_ref[block]) >= threshold) | keep_all))

  return forced | (candidate & ((keys >= threshold) | keep_all)), keeps


def _select_kernel(budget_ref, lengths_ref, scores_ref, q_ref, k_ref, v_ref, out_ref, kept_ref, *stats_refs,
                   rule: str, q_len: int, block_size: int, sm_scale: float, sink: bool, num_splits: int):
  """One (batch, head, split) program.

  budget_ref: [1], τ (f32) or k (int32); lengths_ref: int32 [1]; scores_ref: f32 [n_pad] (n_pad >=
  n_blocks, a power of two; entries past n_blocks are never valid); q_ref: [rows, head_dim]; k_ref, v_ref:
  [max_len, head_dim]. kept_ref: int32 [n_pad], 1 for the kept blocks (every split writes the same row).
  out_ref and stats_refs: as `kernels.decode_sparse_triton._decode_kernel`.
  """
  length = lengths_ref[0]
  kept, keeps = _kept_blocks(budget_ref, lengths_ref, scores_ref, rule=rule, q_len=q_len, block_size=block_size,
                             sink=sink)
  kept_ref[...] = kept.astype(jnp.int32)

  rows = q_ref.shape[0]
  q = q_ref[...]
  attend = functools.partial(attend_block, q=q, k_ref=k_ref, v_ref=v_ref, length=length,
                             positions=query_positions(rows, q_len, length), logit_scale=sm_scale * _LOG2_E,
                             block_size=block_size)
  visit = lambda block, state: lax.cond(keeps(block), lambda s: attend(s, block), lambda s: s, state)
  first, last = split_range((length + block_size - 1) // block_size, num_splits)   # over the valid blocks
  finish(lax.fori_loop(first, last, visit, empty_state(rows, q.shape[-1])), out_ref, stats_refs, num_splits)


def _row_inputs(scores: jax.Array, budget: jax.Array, rule: str) -> tuple[jax.Array, jax.Array, int]:
  """The selection's per-(batch, head) inputs: scores f32 [batch, heads, n_pad] (padded to a power of two;
  padding blocks are never valid), budget [batch, heads, 1] (f32 τ or int32 k) and n_pad."""
  if rule not in SELECTION_RULES:
    raise ValueError(f"rule must be one of {SELECTION_RULES}; got {rule!r}")
  batch, heads, n_blocks = scores.shape
  n_pad = pl.next_power_of_2(n_blocks)
  budget = budget.astype(jnp.float32 if rule == "tau" else jnp.int32)
  return (_pad_axis(scores.astype(jnp.float32), 2, n_pad),
          jnp.broadcast_to(budget[None, :, None], (batch, heads, 1)), n_pad)


def _lists_kernel(budget_ref, lengths_ref, scores_ref, indices_ref, counts_ref, *, rule: str, q_len: int,
                  block_size: int, sink: bool):
  """One (batch, head) program: its kept blocks as a list. indices_ref: int32 [n_pad], written as a
  permutation of the blocks, kept ones first, each group ascending (block j goes to its rank in its group:
  one cumulative sum per group, then one scatter); counts_ref: int32 [1], the kept blocks."""
  n_pad = scores_ref.shape[0]
  kept, _ = _kept_blocks(budget_ref, lengths_ref, scores_ref, rule=rule, q_len=q_len, block_size=block_size,
                         sink=sink)
  kept_ones = kept.astype(jnp.int32)
  count = jnp.sum(kept_ones)
  rank_kept = jnp.cumsum(kept_ones) - 1
  rank_dropped = jnp.cumsum(1 - kept_ones) - 1
  slot = jnp.where(kept, rank_kept, count + rank_dropped)
  indices_ref[slot] = lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
  counts_ref[...] = jnp.full((1,), count, jnp.int32)


@functools.partial(jax.jit, static_argnames=("rule", "q_len", "block_size", "sink", "interpret", "num_warps"))
def select_lists_triton(scores: jax.Array, budget: jax.Array, lengths: jax.Array, *, rule: str, q_len: int,
                        block_size: int, sink: bool = True, interpret: bool = False,
                        num_warps: int = 4) -> tuple[jax.Array, jax.Array]:
  """The kept blocks as lists, chosen by a Pallas kernel (the fused kernel's rule, no sort): what
  `kernels.decode_sparse_reference.select_block_lists` returns, for `decode_sparse_attention_triton` to walk.

  Args:
    scores: f32 [batch, heads, n_blocks], `block_scores`; budget: [heads], τ (f32) for rule "tau", k
      (int32) for "top_k"; lengths: int32 [batch]; q_len: the chunk's tokens; block_size, sink: as
      `decode_select_attention_triton`. interpret: Pallas interpret mode (CPU).

  Returns:
    indices: int32 [batch, heads, n_blocks], a permutation per row, the first `counts` entries the kept
      blocks (ascending), then the others (ascending); counts: int32 [batch, heads].
  """
  batch, heads, n_blocks = scores.shape
  scores, budget, n_pad = _row_inputs(scores, budget, rule)
  row = lambda size: pl.BlockSpec((None, None, size), lambda b, h: (b, h, 0))
  indices, counts = pl.pallas_call(
      functools.partial(_lists_kernel, rule=rule, q_len=q_len, block_size=block_size, sink=sink),
      grid=(batch, heads),
      in_specs=[row(1), pl.BlockSpec((1,), lambda b, h: (b,)), row(n_pad)],
      out_specs=[row(n_pad), row(1)],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, n_pad), jnp.int32),
                 jax.ShapeDtypeStruct((batch, heads, 1), jnp.int32)],
      compiler_params=_compiler_params(num_warps, 1),
      interpret=interpret,
      name=f"decode_select_lists_{rule}_b{block_size}",
  )(budget, lengths.astype(jnp.int32), scores)
  # Padding blocks are never kept and come last among the dropped: the first n_blocks slots hold the real ones.
  return indices[:, :, :n_blocks], counts[:, :, 0]


@functools.partial(jax.jit, static_argnames=("rule", "block_size", "sm_scale", "sink", "interpret", "num_warps",
                                             "num_stages", "num_splits"))
def decode_select_attention_triton(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                                   scores: jax.Array, budget: jax.Array, *, rule: str, block_size: int,
                                   sm_scale: float, sink: bool = True, interpret: bool = False,
                                   num_warps: int = 4, num_stages: int = 2,
                                   num_splits: int = 1) -> tuple[jax.Array, jax.Array]:
  """Selection and attention in one kernel (unchecked: `kernels.decode_sparse` checks).

  Args:
    q: [batch, T, heads, head_dim], T <= block_size, at positions lengths − T … lengths − 1.
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim], max_len a multiple of block_size.
    lengths: int32 [batch], filled slots per sequence (>= T).
    scores: f32 [batch, heads, n_blocks], `block_scores` (q̄ · k̄_j · sm_scale; any value for invalid blocks).
    budget: [heads], τ in (0, 1] (f32) for rule "tau", k >= 1 (int32) for "top_k".
    rule: one of SELECTION_RULES; block_size: slots per block, a power of two >= 16; sm_scale: the logit
      scale; sink: always keep block 0. interpret: Pallas interpret mode (CPU). num_warps, num_stages:
      Triton launch settings. num_splits: programs per (batch, head), each over a contiguous share of
      the valid blocks, merged here in f32.

  Returns:
    (out [batch, T, heads, head_dim] in q.dtype, kept bool [batch, heads, n_blocks]).
  """
  batch, q_len, heads, head_dim = q.shape
  n_blocks = k_cache.shape[1] // block_size
  dtype = q.dtype
  scores, budget, n_pad = _row_inputs(scores, budget, rule)
  q, k_cache, v_cache, q_spec, kv_spec = grid_inputs(q, k_cache, v_cache)
  in_specs = [
      pl.BlockSpec((None, None, 1), lambda b, h, s: (b, h, 0)),
      pl.BlockSpec((1,), lambda b, h, s: (b,)),
      pl.BlockSpec((None, None, n_pad), lambda b, h, s: (b, h, 0)),
      q_spec,
      kv_spec,
      kv_spec,
  ]
  out_specs, out_shape = attention_outputs(q, q_spec, num_splits)
  # The kept blocks, second: the kernel's refs are (out, kept, *split statistics).
  out_specs.insert(1, split_part(n_pad))
  out_shape.insert(1, jax.ShapeDtypeStruct((batch, heads, num_splits, n_pad), jnp.int32))
  result = pl.pallas_call(
      functools.partial(_select_kernel, rule=rule, q_len=q_len, block_size=block_size, sm_scale=sm_scale,
                        sink=sink, num_splits=num_splits),
      grid=(batch, heads, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name=f"decode_select_attention_{rule}_b{block_size}" + (f"_split{num_splits}" if num_splits > 1 else ""),
  )(budget, lengths.astype(jnp.int32), scores, q, k_cache, v_cache)
  kept = result[1][:, :, 0, :n_blocks] > 0
  out = attention_result([result[0], *result[2:]], num_splits, q_len=q_len, head_dim=head_dim, dtype=dtype)
  return out, kept
