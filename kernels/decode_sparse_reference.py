"""Decode-phase block-sparse attention in pure jnp: which cached key blocks a query chunk keeps, and the
attention over them. The semantics the Pallas kernel (`kernels.decode_sparse_triton`) matches.

A decode step attends a chunk of T new queries (1 <= T <= block_size, the newest tokens, at positions
length − T … length − 1 of their sequence; their K/V are already in the cache) to a KV cache
[batch, max_len, kv_heads, head_dim] whose first `lengths[b]` slots are filled (ragged over the batch).
The cache is cut into max_len / block_size key blocks; a block is *valid* when it holds a filled slot.

Selection, per (batch, query head), in f32 (Quest-style page selection with SpargeAttn's scores):
  1. Score. q̄ = the mean of the chunk's queries; k̄_j = the mean of block j's filled keys (kv head
     h // (heads // kv_heads)); score_j = q̄·k̄_j · sm_scale, whose softmax is SpargeAttn's pooled
     estimate of a block's attention mass (`kernels.sparge_mask`). Quest's upper bound
     Σ_d max(q_d·min_d, q_d·max_d) is a ranking score, not a logit, so a softmax CDF over it has no
     meaning; it also needs per-block min/max tables, where a running per-block sum (`key_block_sums`,
     kept by `afbs_jax.model.cache`) is all a cache needs to keep for this rule. SpargeAttn centres K
     before pooling; that shifts every score of a row by one constant, so the softmax is unchanged and it
     is left out.
  2. Forced blocks, always kept: the *local* blocks, those holding any query of the chunk (one, or two
     when the chunk crosses a block boundary), so every query sees its own key and the in-chunk causal
     part is exact; and, with `sink=True`, block 0 (the attention sink of trained LLMs, StreamingLLM).
  3. Candidates are the valid blocks that are not forced, ranked by score (descending; ties by block
     index). τ top-CDF over the candidates' own distribution (the softmax of their scores alone, the
     forced blocks left out): the fewest leading candidates whose mass reaches τ; that is, a candidate is
     kept while the mass of the candidates ranked before it is < τ, so the one that crosses τ is kept
     too (top-p), and any τ > 0 keeps at least one candidate. Why not SpargeAttn's prefill rule over
     every block (inclusive mass <= τ, at least one block): the pooled score of the sink block, whose
     mean key carries the first token's outlier key, takes most of the softmax in many heads; counted
     first, it used up τ, so those heads read the forced blocks alone, and on a retrieval prompt they
     lost the needle that their true attention goes to (niah_single at 1K on the H200, AFBS-BO's decode
     τ at 0.44 decode sparsity: 0.18 accuracy against dense 1.00 and a top-k budget's 0.92 at 0.50;
     results/frontier_decode_rule_inclusive.json beside results/frontier.json, commit 4537104). Forced
     blocks are read regardless, so τ is spent on the rest, as SpargeAttn's prefill spends it beyond a
     local floor. The exclusive mass only grows, so
     counting the candidates below τ keeps the chosen set a prefix of the ranking even where a parallel
     cumsum rounds unevenly; τ >= 1 keeps every valid block outright (no rounding can drop one).
     top-k: the k best candidates are kept (the budget is on top of the forced blocks; k >= the number
     of blocks keeps all).
Attention then runs over the kept blocks only: causal (key u is visible to the query at position p iff
u <= p, which also masks every slot at or past length; whatever those slots hold, NaN included, never
reaches the output), f32 logits, softmax and P·V accumulation, output
in q.dtype (the precision policy of `afbs_jax.attention.policy`). Decode sparsity = 1 − kept / valid
blocks, per (batch, head).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
DECODE_TAU_RULE = "top_p_candidates"
"""What τ means (rule 3 above), stored with tuned decode thresholds: tables tuned under an earlier rule
(stored without a name: "inclusive", a candidate kept while the mass of every block up to it, the forced
ones counted first, stays <= τ) mean other blocks and are refused."""


def _block_sums(keys: jax.Array, filled: jax.Array, block_size: int) -> jax.Array:
  """keys [batch, slots, kv_heads, head_dim], filled bool [batch, slots] (slots a multiple of block_size)
  -> f32 [batch, slots // block_size, kv_heads, head_dim], each block's filled keys summed.

  The sum is an explicit pairwise tree (adjacent slots, then adjacent pairs, ...): elementwise adds,
  which XLA never reassociates, so a block's sum has the same bits whether it is computed with every
  block of the cache or alone (`update_key_block_sums`), and cached sums select exactly the blocks a
  full re-pooling selects. A reduce op leaves its order to the compiler, which may differ by shape.
  """
  batch, slots, kv_heads, head_dim = keys.shape
  x = jnp.where(filled[:, :, None, None], keys.astype(jnp.float32), 0.0)
  x = x.reshape(batch, slots // block_size, block_size, kv_heads, head_dim)
  while x.shape[2] > 1:
    x = x[:, :, 0::2] + x[:, :, 1::2]
  return x[:, :, 0]


def key_block_sums(k_cache: jax.Array, lengths: jax.Array, block_size: int) -> jax.Array:
  """The sum of every cache block's filled keys: f32 [batch, n_blocks, kv_heads, head_dim] (0 for empty).

  Args:
    k_cache: [batch, max_len, kv_heads, head_dim], max_len a multiple of block_size.
    lengths: int [batch], filled slots per sequence (slots at or past it are left out, whatever they hold).
    block_size: slots per block, a power of two.
  """
  filled = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]                   # [B, S]
  return _block_sums(k_cache, filled, block_size)


def update_key_block_sums(sums: jax.Array, k_cache: jax.Array, old_lengths: jax.Array, new_lengths: jax.Array,
                          block_size: int, chunk: int) -> jax.Array:
  """`key_block_sums(k_cache, new_lengths, block_size)` from the sums at `old_lengths`, after a chunk of
  `chunk` (static) slots old_lengths .. new_lengths − 1 was written: only the blocks holding those slots
  are re-summed from the cache (ceil(chunk / block_size) + 1 blocks at most, per sequence), bit-identical
  to summing the whole cache. Every other block's filled slots are unchanged; blocks past new_lengths
  hold 0 or stale sums (they are not valid, so selection never reads them).

  Args:
    sums: f32 [batch, n_blocks, kv_heads, head_dim], exact for every block below old_lengths' block.
    k_cache: [batch, max_len, kv_heads, head_dim] with the chunk written.
    old_lengths, new_lengths: int [batch], new_lengths = old_lengths + chunk.
  """
  n_blocks = sums.shape[1]
  touched = min(n_blocks, -(-chunk // block_size) + 1)

  def one_sequence(sums, keys, old, new):  # [n, K, D], [S, K, D], [], []
    first = jnp.minimum(old // block_size, n_blocks - touched)  # the window stays inside the cache
    window = jax.lax.dynamic_slice_in_dim(keys, first * block_size, touched * block_size, axis=0)
    filled = first * block_size + jnp.arange(touched * block_size) < new
    return jax.lax.dynamic_update_slice_in_dim(sums, _block_sums(window[None], filled[None], block_size)[0],
                                               first, axis=0)

  return jax.vmap(one_sequence)(sums, k_cache, old_lengths, new_lengths)


def block_means(sums: jax.Array, lengths: jax.Array, block_size: int) -> jax.Array:
  """Block sums f32 [batch, n_blocks, kv_heads, head_dim] -> the mean filled key per block (0 for empty).

  A multiply by the counts' reciprocals: XLA may rewrite a division by a broadcast that way in one
  program and not another, and a fixed formula keeps cached and pooled means bit-identical."""
  n_blocks = sums.shape[1]
  counts = jnp.clip(lengths[:, None] - jnp.arange(n_blocks)[None, :] * block_size, 1, block_size)
  return sums * (1.0 / counts.astype(jnp.float32))[:, :, None, None]


def key_block_means(k_cache: jax.Array, lengths: jax.Array, block_size: int) -> jax.Array:
  """The mean filled key of every cache block: f32 [batch, n_blocks, kv_heads, head_dim] (0 for empty);
  `block_means` of `key_block_sums`.

  Args:
    k_cache: [batch, max_len, kv_heads, head_dim], max_len a multiple of block_size.
    lengths: int [batch], filled slots per sequence.
    block_size: slots per block.
  """
  return block_means(key_block_sums(k_cache, lengths, block_size), lengths, block_size)


def block_roles(block: jax.Array, lengths: jax.Array, *, q_len: int, block_size: int,
                sink: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(valid, forced, candidate) bool, elementwise over block indices `block` and `lengths` broadcast
  together (rule 2 above): valid blocks hold a filled slot; forced ones are the valid blocks holding a
  query of the chunk and, with `sink`, block 0; candidates are the valid blocks not forced. Plain jnp, so
  the in-kernel selection (`kernels.decode_select_triton`) applies the same rule to one program's row
  and to one block index."""
  valid = block * block_size < lengths
  forced = (block >= (lengths - q_len) // block_size) & (block <= (lengths - 1) // block_size)
  if sink:
    forced |= block == 0
  forced &= valid
  return valid, forced, valid & ~forced


def block_scores(q: jax.Array, key_means: jax.Array, sm_scale: float) -> jax.Array:
  """f32 [batch, heads, n_blocks]: the chunk's mean query against every block's mean key, times sm_scale
  (rule 1 above). q: [batch, T, heads, head_dim]; key_means: f32 [batch, n_blocks, kv_heads, head_dim]."""
  batch, _, heads, head_dim = q.shape
  n_blocks, kv_heads = key_means.shape[1], key_means.shape[2]
  q_mean = jnp.mean(q.astype(jnp.float32), axis=1).reshape(batch, kv_heads, heads // kv_heads, head_dim)
  return jnp.einsum("bkgd,bnkd->bkgn", q_mean, key_means,
                    precision=_HIGHEST).reshape(batch, heads, n_blocks) * sm_scale


def select_block_lists(q: jax.Array, k_cache: jax.Array, lengths: jax.Array, *, tau: jax.Array | None,
                       top_k: jax.Array | None, block_size: int, sm_scale: float, sink: bool = True,
                       key_means: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The kept key blocks of every (batch, query head) as index lists; unchecked (`kernels.decode_sparse`
  checks).

  One stable sort ranks the candidates (descending probability, ties by index); the chosen ones are a
  prefix of that ranking (top-k: the first k; τ: as many as start below τ of the candidates' mass), so the kept
  blocks come out already listed and a kernel walks them in that order: no second sort to invert the
  ranking, no compaction of a mask.

  Args:
    q: [batch, T, heads, head_dim]; k_cache: [batch, max_len, kv_heads, head_dim]; lengths: int [batch].
    tau: f32 [heads] in (0, 1], or None; top_k: int32 [heads] >= 1, or None (exactly one is given).
    block_size: slots per key block (divides max_len); sm_scale: the logit scale.
    sink: always keep block 0.
    key_means: `key_block_means(k_cache, lengths, block_size)` if the caller keeps it; computed if None.

  Returns:
    indices: int32 [batch, heads, n_blocks], a permutation of the blocks per row whose first `counts`
      entries are the kept blocks: the forced ones (ascending), then the chosen candidates by rank;
    counts: int32 [batch, heads], kept blocks per row (>= 1);
    valid: bool [batch, n_blocks], the blocks holding a filled slot.
  """
  batch, q_len, heads, _ = q.shape
  n_blocks = k_cache.shape[1] // block_size
  if key_means is None:
    key_means = key_block_means(k_cache, lengths, block_size)
  valid, forced, candidate = block_roles(jnp.arange(n_blocks)[None, :], lengths[:, None], q_len=q_len,
                                         block_size=block_size, sink=sink)            # [B, n] each
  scores = block_scores(q, key_means, sm_scale)                                       # [B, H, n]
  is_candidate = candidate[:, None, :]
  # Candidates first, by descending score; non-candidates (+inf) last, by index: the forced blocks
  # (block 0 and the chunk's blocks, all below the length) ahead of the invalid ones. Stable. Scores,
  # not probabilities, so candidates whose probability underflows still rank.
  order = jnp.argsort(jnp.where(is_candidate, -scores, jnp.inf), axis=-1, stable=True)   # [B, H, n]
  n_candidates = jnp.sum(candidate, axis=-1, dtype=jnp.int32)[:, None]                # [B, 1]
  n_forced = jnp.sum(forced, axis=-1, dtype=jnp.int32)[:, None]                       # [B, 1]
  if tau is not None:
    # The candidates' own softmax (a row without candidates gets zeros: nothing to choose).
    top = jnp.max(jnp.where(is_candidate, scores, -jnp.inf), axis=-1, keepdims=True)
    weights = jnp.where(is_candidate, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    mass = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    sorted_mass = jnp.take_along_axis(mass, order, axis=-1)
    mass_before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass   # candidates' mass ahead of each rank
    ranked = jnp.arange(n_blocks)[None, None, :] < n_candidates[:, :, None]
    n_chosen = jnp.sum(ranked & (mass_before < tau[None, :, None]), axis=-1, dtype=jnp.int32)
    n_chosen = jnp.where((tau >= 1.0)[None, :], n_candidates, n_chosen)
  else:
    n_chosen = jnp.minimum(top_k[None, :], n_candidates)
  # Rotate the forced blocks to the front: slot j reads order[n_candidates + j] for j < n_forced, then
  # the candidates, then the invalid blocks in place.
  slot = jnp.arange(n_blocks, dtype=jnp.int32)[None, None, :]
  nf, nc = n_forced[:, :, None], n_candidates[:, :, None]
  source = jnp.where(slot < nf, nc + slot, jnp.where(slot < nf + nc, slot - nf, slot))
  indices = jnp.take_along_axis(order, jnp.broadcast_to(source, order.shape), axis=-1).astype(jnp.int32)
  counts = jnp.broadcast_to(n_forced + n_chosen, (batch, heads)).astype(jnp.int32)
  return indices, counts, valid


def kept_from_lists(indices: jax.Array, counts: jax.Array) -> jax.Array:
  """bool [batch, heads, n_blocks]: the mask of the first `counts` entries of each row of `indices`
  (a permutation per row, `select_block_lists`)."""
  batch, heads, n_blocks = indices.shape
  listed = jnp.arange(n_blocks)[None, None, :] < counts[:, :, None]
  return jnp.zeros(indices.shape, bool).at[jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None],
                                           indices].set(listed)


def select_blocks(q: jax.Array, k_cache: jax.Array, lengths: jax.Array, *, tau: jax.Array | None,
                  top_k: jax.Array | None, block_size: int, sm_scale: float, sink: bool = True,
                  key_means: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The kept key blocks of every (batch, query head) as a mask; `select_block_lists`' arguments.

  Returns:
    kept: bool [batch, heads, n_blocks], a subset of the valid blocks that holds every forced one;
    valid: bool [batch, n_blocks], the blocks holding a filled slot.
  """
  indices, counts, valid = select_block_lists(q, k_cache, lengths, tau=tau, top_k=top_k, block_size=block_size,
                                              sm_scale=sm_scale, sink=sink, key_means=key_means)
  return kept_from_lists(indices, counts), valid


def decode_sparsity(kept: jax.Array, valid: jax.Array) -> jax.Array:
  """f32 [batch, heads]: 1 − kept / valid blocks (kept: bool [batch, heads, n], valid: bool [batch, n])."""
  return sparsity_from_counts(jnp.sum(kept & valid[:, None, :], axis=-1, dtype=jnp.int32), valid)


def sparsity_from_counts(counts: jax.Array, valid: jax.Array) -> jax.Array:
  """`decode_sparsity` from the kept blocks' counts (int [batch, heads], all of them valid, as
  `select_block_lists` returns them): no mask needed."""
  n_valid = jnp.maximum(jnp.sum(valid, axis=-1, dtype=jnp.float32), 1.0)
  return 1.0 - counts.astype(jnp.float32) / n_valid[:, None]


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale"))
def decode_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                               kept: jax.Array, *, block_size: int, sm_scale: float) -> jax.Array:
  """Attention of the chunk over the kept blocks only; GQA without repeating K/V.

  Args:
    q: [batch, T, heads, head_dim], the queries at positions lengths − T … lengths − 1.
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim]; lengths: int [batch].
    kept: bool [batch, heads, max_len // block_size].

  Returns:
    [batch, T, heads, head_dim] in q.dtype; a query that sees no kept key outputs 0.
  """
  batch, q_len, heads, head_dim = q.shape
  max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
  group = heads // kv_heads
  positions = lengths[:, None] - q_len + jnp.arange(q_len)[None, :]                    # [B, T]
  causal = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]                 # [B, T, S]
  slot_kept = jnp.repeat(kept, block_size, axis=-1).reshape(batch, kv_heads, group, 1, max_len)
  visible = causal[:, None, None] & slot_kept                                          # [B, K, G, T, S]
  q_groups = q.reshape(batch, q_len, kv_heads, group, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_groups, k_cache, preferred_element_type=jnp.float32,
                      precision=_HIGHEST) * sm_scale
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(row_max == -jnp.inf, 0.0, row_max))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  # Slots past the length may hold anything (NaN included): P is 0 there, but 0 * NaN is not 0.
  filled = jnp.arange(max_len)[None, :, None, None] < lengths[:, None, None, None]
  values = jnp.where(filled, v_cache.astype(jnp.float32), 0.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, values, precision=_HIGHEST)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def decode_sparse_attention_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                      lengths: jax.Array, *, tau: jax.Array | None = None,
                                      top_k: jax.Array | None = None, block_size: int = 64,
                                      sm_scale: float | None = None,
                                      sink: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Selection and attention in one (unchecked; `kernels.decode_sparse` is the checked entry).

  Args: as `select_blocks` (tau: f32 [heads] or None, top_k: int [heads] or None) and
    `decode_attention_reference`; sm_scale 1/sqrt(head_dim) when None.

  Returns:
    (out [batch, T, heads, head_dim] in q.dtype, kept bool [batch, heads, n_blocks],
     sparsity f32 [batch, heads] = 1 − kept / valid blocks).
  """
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  lengths = jnp.asarray(lengths, jnp.int32)
  kept, valid = select_blocks(q, k_cache, lengths, tau=tau, top_k=top_k, block_size=block_size,
                              sm_scale=scale, sink=sink)
  out = decode_attention_reference(q, k_cache, v_cache, lengths, kept, block_size=block_size, sm_scale=scale)
  return out, kept, decode_sparsity(kept, valid)
