"""Decode-phase sparse attention: the Pallas kernel (interpret mode), the jnp reference and float64 oracles.

The oracles here share no code with `kernels.decode_sparse_reference`: block selection is a loop over
(batch, head) in numpy, attention is dense float64 softmax with the kept blocks expanded to a slot mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_select_triton import kept_threshold, order_keys, select_lists_triton
from kernels.decode_sparse import SELECTIONS, decode_sparse_attention, suggested_num_splits
from kernels.decode_sparse_reference import (block_scores, decode_sparse_attention_reference, key_block_means,
                                             key_block_sums, select_block_lists, update_key_block_sums)
from tests.kernels import _oracles

# The Pallas kernel: interpreted on CPU; on a GPU its Triton lowering is checked too.
KERNEL_BACKENDS = ("interpret",) + (("triton",) if jax.default_backend() == "gpu" else ())

BLOCK = 16
MAX_LEN = 128
N_BLOCKS = MAX_LEN // BLOCK


def _inputs(seed: int, *, q_len: int, heads: int, kv_heads: int, lengths, dtype=jnp.float32,
            head_dim: int = 16):
  """q [batch, q_len, heads, head_dim], caches [batch, MAX_LEN, kv_heads, head_dim] (garbage past each
  length, which must never be read), lengths int32 [batch]."""
  batch = len(lengths)
  q, _, _ = _oracles.random_qkv(seed, batch=batch, q_len=q_len, kv_len=q_len, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, dtype=dtype, scale=2.0)
  _, k, v = _oracles.random_qkv(seed + 1, batch=batch, q_len=1, kv_len=MAX_LEN, heads=heads,
                                kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, scale=2.0)
  lengths = np.asarray(lengths, np.int32)
  stale = np.arange(MAX_LEN)[None, :, None, None] >= lengths[:, None, None, None]
  k = jnp.where(stale, jnp.asarray(1e4, dtype), k)
  v = jnp.where(stale, jnp.asarray(jnp.nan, dtype), v)
  return q, k, v, jnp.asarray(lengths)


def _f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _oracle_kept(q, k, lengths, *, tau=None, top_k=None, sink=True) -> np.ndarray:
  """bool [batch, heads, N_BLOCKS]: the documented selection rule, one (batch, head) at a time."""
  q, k = _f64(q), _f64(k)
  batch, q_len, heads, head_dim = q.shape
  group = heads // k.shape[2]
  kept = np.zeros((batch, heads, N_BLOCKS), bool)
  for b in range(batch):
    length = int(lengths[b])
    valid = [j for j in range(N_BLOCKS) if j * BLOCK < length]
    forced = {j for j in valid if (length - q_len) // BLOCK <= j <= (length - 1) // BLOCK or (sink and j == 0)}
    for h in range(heads):
      q_mean = q[b, :, h].mean(axis=0)
      scores = np.array([q_mean @ k[b, j * BLOCK:min((j + 1) * BLOCK, length), h // group].mean(axis=0)
                         for j in valid]) / math.sqrt(head_dim)
      score = dict(zip(valid, scores))
      candidates = sorted((j for j in valid if j not in forced), key=lambda j: -score[j])
      if tau is not None:
        t = float(np.broadcast_to(tau, (heads,))[h])
        # The candidates' own softmax; top-p: kept while the candidates' mass before it is below τ.
        top = max((score[j] for j in candidates), default=0.0)
        total = sum(np.exp(score[j] - top) for j in candidates)
        mass, chosen = 0.0, []
        for j in candidates:
          if mass < t or t >= 1:
            chosen.append(j)
          mass += np.exp(score[j] - top) / total
      else:
        chosen = candidates[:int(np.broadcast_to(top_k, (heads,))[h])]
      kept[b, h, sorted(forced | set(chosen))] = True
  return kept


def _oracle_attention(q, k, v, lengths, kept) -> np.ndarray:
  """float64 dense attention of the chunk over the slots of the kept blocks (causal by position)."""
  q, k, v = _f64(q), _f64(k), _f64(v)
  batch, q_len, heads, head_dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      slots = np.repeat(kept[b, h], BLOCK)
      for t in range(q_len):
        position = int(lengths[b]) - q_len + t
        visible = slots & (np.arange(MAX_LEN) <= position)
        logits = k[b, visible, h // group] @ q[b, t, h] / math.sqrt(head_dim)
        weights = np.exp(logits - logits.max())
        out[b, t, h] = weights @ v[b, visible, h // group] / weights.sum()
  return out


def _check_close(out, expected, dtype):
  out = _f64(out)
  assert np.isfinite(out).all()
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)
  else:
    assert _oracles.relative_error(out, expected) <= 2e-2


# (q_len, heads, kv_heads, lengths): a single token and a chunk crossing a block boundary; MHA and GQA;
# ragged lengths, one ending exactly on a block edge and one filling the cache.
CASES = [
    (1, 4, 2, (37, 128)),
    (5, 2, 2, (20, 64, 99)),
    (16, 4, 1, (16, 90)),
]


@pytest.mark.parametrize("rule, dtype", [("tau", jnp.float32), ("top_k", jnp.float32), ("tau", jnp.bfloat16)],
                         ids=["tau-f32", "top_k-f32", "tau-bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_H{}_K{}".format(*c[:3]))
def test_kernel_and_reference_match_the_oracles(case, rule, dtype):
  q_len, heads, kv_heads, lengths = case
  q, k, v, lengths = _inputs(q_len + heads, q_len=q_len, heads=heads, kv_heads=kv_heads, lengths=lengths,
                             dtype=dtype)
  rule_args = ({"tau": np.linspace(0.3, 0.9, heads).astype(np.float32)} if rule == "tau"
               else {"top_k": np.arange(1, heads + 1, dtype=np.int32)})
  results = {(backend, selection): decode_sparse_attention(q, k, v, lengths, block_size=BLOCK, backend=backend,
                                                           return_stats=True, selection=selection, **rule_args)
             for backend in ("reference", *KERNEL_BACKENDS) for selection in SELECTIONS
             if backend != "reference" or selection == "lists"}
  ref_out, ref_stats = results["reference", "lists"]
  kept = np.asarray(ref_stats.kept)
  if dtype == jnp.float32:  # bf16 rounding may reorder near-tied blocks against the float64 oracle
    np.testing.assert_array_equal(kept, _oracle_kept(q, k, lengths, **rule_args))
  expected = _oracle_attention(q, k, v, lengths, kept)
  _check_close(ref_out, expected, dtype)
  for (backend, selection), (kernel_out, kernel_stats) in results.items():
    assert kernel_out.shape == q.shape and kernel_out.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(kernel_stats.kept), kept)
    _check_close(kernel_out, expected, dtype)
  n_valid = -(-np.asarray(lengths) // BLOCK)
  np.testing.assert_allclose(np.asarray(ref_stats.sparsity), 1 - kept.sum(-1) / n_valid[:, None], atol=1e-6)
  assert 0 < kept.sum() < kept.size


@pytest.mark.parametrize("backend, selection", [("reference", "lists")] + [
    (backend, selection) for backend in KERNEL_BACKENDS for selection in SELECTIONS])
@pytest.mark.parametrize("rule", [{"tau": 1.0}, {"top_k": N_BLOCKS}], ids=["tau1", "top_k_all"])
def test_keep_all_is_dense_attention(rule, backend, selection):
  q, k, v, lengths = _inputs(3, q_len=3, heads=4, kv_heads=2, lengths=(50, 128))
  out, stats = decode_sparse_attention(q, k, v, lengths, block_size=BLOCK, backend=backend,
                                       return_stats=True, selection=selection, **rule)
  valid = np.arange(N_BLOCKS)[None, :] * BLOCK < np.asarray(lengths)[:, None]
  np.testing.assert_array_equal(np.asarray(stats.kept), np.broadcast_to(valid[:, None], stats.kept.shape))
  np.testing.assert_array_equal(np.asarray(stats.sparsity), 0.0)
  dense = np.ones((2, 4, N_BLOCKS), bool)   # every slot; the causal mask alone hides the stale ones
  np.testing.assert_allclose(_f64(out), _oracle_attention(q, k, v, lengths, dense), atol=2e-5, rtol=0)


@pytest.mark.parametrize("sink", [True, False])
def test_tiny_tau_keeps_the_forced_blocks_and_the_best_candidate(sink):
  # Length 70: the chunk's 8 queries sit at 62..69, across blocks 3 and 4 of 5 valid blocks.
  q, k, v, lengths = _inputs(5, q_len=8, heads=2, kv_heads=1, lengths=(70, 16, 128))
  out, stats = decode_sparse_attention(q, k, v, lengths, tau=1e-6, block_size=BLOCK, sink=sink,
                                       backend="reference", return_stats=True)
  forced = np.zeros((3, N_BLOCKS), bool)
  forced[0, [3, 4]] = True
  forced[1, 0] = True
  forced[2, 7] = True
  forced[:, 0] |= sink
  kept = np.asarray(stats.kept)
  assert np.all(kept >= forced[:, None])
  # Any τ > 0 keeps one candidate besides the forced blocks (top-p), the best scored, where one is left.
  n_valid = np.array([5, 1, 8])
  n_kept = np.minimum(forced.sum(-1) + 1, n_valid)
  np.testing.assert_array_equal(kept.sum(-1), np.broadcast_to(n_kept[:, None], kept.shape[:2]))
  np.testing.assert_array_equal(kept, _oracle_kept(q, k, lengths, tau=1e-6, sink=sink))
  np.testing.assert_allclose(np.asarray(stats.sparsity), np.broadcast_to(1 - (n_kept / n_valid)[:, None], (3, 2)),
                             atol=1e-6)
  np.testing.assert_allclose(_f64(out), _oracle_attention(q, k, v, lengths, np.asarray(stats.kept)),
                             atol=2e-5, rtol=0)
  # The unchecked one-call reference is the same computation.
  ref_out, ref_kept, ref_sparsity = decode_sparse_attention_reference(
      q, k, v, lengths, tau=jnp.full((2,), 1e-6), block_size=BLOCK, sink=sink)
  np.testing.assert_array_equal(np.asarray(ref_kept), np.asarray(stats.kept))
  np.testing.assert_array_equal(np.asarray(ref_out), np.asarray(out))
  np.testing.assert_array_equal(np.asarray(ref_sparsity), np.asarray(stats.sparsity))


@pytest.mark.parametrize("backend, selection", [("reference", "lists")] + [
    (backend, selection) for backend in KERNEL_BACKENDS for selection in SELECTIONS])
def test_tau_keeps_a_candidate_that_holds_most_of_the_mass(backend, selection):
  # A retrieval head: the sink's pooled score is the highest (its mean key carries the first token's
  # outlier), then block 3 of 8 ("the needle"), ~92 % of the candidates' mass. τ = 0.5 must keep the needle
  # (the forced blocks' mass is not counted; top-p keeps the block that crosses τ) and nothing else. A rule
  # counting the forced mass first (~0.98 here) or the inclusive mass <= τ keeps only the forced blocks.
  head_dim, length = 16, MAX_LEN
  direction = np.zeros(head_dim, np.float32)
  direction[0] = 1.0
  q = jnp.asarray(np.broadcast_to(direction * 4.0, (1, 1, 1, head_dim)))
  k = np.zeros((1, MAX_LEN, 1, head_dim), np.float32)
  k[0, 3 * BLOCK:4 * BLOCK, 0] = direction * 4.0     # pooled score 16 / 4 = 4: e⁴ / (e⁴ + 5) ≈ 0.92 of candidates
  k[0, :BLOCK, 0] = direction * 8.0                  # the sink: pooled score 8
  v = jnp.asarray(np.random.default_rng(0).normal(size=k.shape).astype(np.float32))
  lengths = jnp.asarray([length], jnp.int32)
  _, stats = decode_sparse_attention(q, jnp.asarray(k), v, lengths, tau=0.5, block_size=BLOCK, backend=backend,
                                     return_stats=True, selection=selection)
  expected = np.zeros(N_BLOCKS, bool)
  expected[[0, 3, N_BLOCKS - 1]] = True
  np.testing.assert_array_equal(np.asarray(stats.kept)[0, 0], expected)
  np.testing.assert_array_equal(_oracle_kept(q, k, lengths, tau=0.5)[0, 0], expected)


def test_top_k_is_a_budget_on_top_of_the_forced_blocks():
  q, k, v, lengths = _inputs(8, q_len=1, heads=2, kv_heads=2, lengths=(128, 40))
  top_k = np.array([2, 5], np.int32)
  _, stats = decode_sparse_attention(q, k, v, lengths, top_k=top_k, block_size=BLOCK, backend="reference",
                                     return_stats=True)
  # Forced: block 0 and the last block. Row 0 has 8 valid blocks, row 1 has 3 (one candidate left).
  np.testing.assert_array_equal(np.asarray(stats.kept).sum(-1), [[4, 7], [3, 3]])
  np.testing.assert_allclose(np.asarray(stats.sparsity), [[0.5, 1 / 8], [0.0, 0.0]], atol=1e-6)


def test_tau_is_traced_and_key_means_can_be_supplied():
  q, k, v, lengths = _inputs(11, q_len=2, heads=2, kv_heads=1, lengths=(100, 77))
  means = key_block_means(k, lengths, BLOCK)

  @jax.jit
  def sparsity(tau):
    return decode_sparse_attention(q, k, v, lengths, tau=tau, block_size=BLOCK, key_means=means,
                                   return_stats=True)[1].sparsity

  low, high = sparsity(jnp.float32(0.05)), sparsity(jnp.float32(0.95))
  assert np.all(np.asarray(low) >= np.asarray(high)) and np.any(np.asarray(low) > np.asarray(high))
  assert sparsity._cache_size() == 1


@pytest.mark.parametrize("old, chunk", [((100, 16), 1), ((47, 3), 3), ((127, 40), 1), ((120, 70), 8),
                                        ((110, 0), 16)])
def test_running_key_sums_equal_a_full_pooling_bit_for_bit(old, chunk):
  """A cache's running sums after a write (only the touched blocks re-summed) have the bits of pooling the
  whole cache: the same block means, so exactly the same selection. Stale slots (1e4, NaN) never count;
  (127, 1) fills the last slot, (120, 8) touches the last two blocks (the window is clamped), (110, 16)
  fills a sequence from empty."""
  _, k, _, _ = _inputs(21, q_len=1, heads=2, kv_heads=2, lengths=old)
  old = jnp.asarray(old, jnp.int32)
  stale = (jnp.arange(MAX_LEN)[None, :] >= old[:, None]) & (jnp.arange(MAX_LEN) % 2 == 1)[None, :]
  k = jnp.where(stale[:, :, None, None], jnp.nan, k)          # stale slots hold 1e4 and NaN
  new = old + chunk
  # numpy, not jax.random: a threefry program per chunk length would compile four times (~1.5 s each).
  fresh = jnp.asarray(np.random.default_rng(5).standard_normal((2, chunk, 2, 16)) * 3.0, jnp.float32)
  written = jax.vmap(lambda buffer, x, start: jax.lax.dynamic_update_slice(buffer, x, (start, 0, 0)))(k, fresh, old)
  running = update_key_block_sums(key_block_sums(k, old, BLOCK), written, old, new, BLOCK, chunk)
  full = key_block_sums(written, new, BLOCK)
  valid = np.arange(N_BLOCKS)[None, :] * BLOCK < np.asarray(new)[:, None]
  np.testing.assert_array_equal(np.asarray(running)[valid], np.asarray(full)[valid])
  assert np.isfinite(np.asarray(full)).all()
  counts = np.clip(np.asarray(new)[:, None] - BLOCK * np.arange(N_BLOCKS), 1, BLOCK)[:, :, None, None]
  np.testing.assert_allclose(np.asarray(key_block_means(written, new, BLOCK)), np.asarray(full) / counts,
                             rtol=1e-6, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(tau=0.0), r"tau must lie in \(0, 1\]"),
    (dict(tau=1.5), r"tau must lie in \(0, 1\]"),
    (dict(tau=np.ones(3)), r"tau must be a scalar or have shape \(2,\)"),
    (dict(tau=None, top_k=0), r"top_k must be >= 1"),
    (dict(tau=None, top_k=1.5), r"top_k must be an integer"),
    (dict(top_k=2), r"exactly one of tau .* and top_k"),
    (dict(tau=None), r"exactly one of tau .* and top_k"),
    (dict(block_size=48), r"block_size must be a power of two"),
    (dict(block_size=256), r"block_size=256 must divide the cache's max_len=128"),
    (dict(q_len=20), r"q_len=20 must be at most block_size=16"),
    (dict(lengths=(10, 200)), r"lengths .* must lie in \[q_len=1, max_len=128\]"),
    (dict(lengths=(0, 5)), r"lengths .* must lie in \[q_len=1, max_len=128\]"),
    (dict(lengths=(3,)), r"lengths must be an int array of shape \(batch,\)=\(2,\)"),
    (dict(kv_heads=3, heads=4), r"q heads \(4\) must be a multiple of the cache's kv_heads \(3\)"),
    (dict(k_dtype=jnp.bfloat16), r"must share one floating dtype"),
    (dict(backend="cuda"), r"backend must be one of"),
    (dict(key_means=np.zeros((2, 3, 1, 16))), r"key_means must be f32"),
    (dict(num_splits=0), r"num_splits must be an integer in \[1, 8\]"),
    (dict(num_splits=9), r"num_splits must be an integer in \[1, 8\]"),
    (dict(num_splits=2.0), r"num_splits must be an integer"),
    (dict(selection="sorted"), r"selection must be one of \('lists', 'in_kernel', 'pallas_lists'\)"),
])
def test_bad_arguments_raise_clear_errors(change, message):
  heads, kv_heads = change.pop("heads", 2), change.pop("kv_heads", 1)
  q_len = change.pop("q_len", 1)
  k_dtype = change.pop("k_dtype", jnp.float32)
  lengths = change.pop("lengths", (30, 128))
  q = jnp.zeros((2, q_len, heads, 16))
  k = jnp.zeros((2, MAX_LEN, kv_heads, 16), k_dtype)
  v = jnp.zeros((2, MAX_LEN, kv_heads, 16))
  arguments = dict(tau=0.5, block_size=BLOCK, backend="reference") | change
  with pytest.raises(ValueError, match=message):
    decode_sparse_attention(q, k, v, np.asarray(lengths, np.int32), **arguments)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("num_splits", [2, 3, None])
@pytest.mark.parametrize("rule", ["tau", "top_k"])
def test_split_k_matches_the_oracle(rule, num_splits, selection):
  """Split-K programs walk contiguous shares of a kept list and their softmax states are merged: the
  result is the oracle's, with shares that are empty (3 splits of 1-2 kept blocks), single-row and
  crossing-chunk rows, GQA and ragged lengths."""
  q, k, v, lengths = _inputs(31, q_len=5, heads=4, kv_heads=2, lengths=(20, 128, 77))
  rule_args = ({"tau": np.array([1e-6, 0.3, 0.7, 1.0], np.float32)} if rule == "tau"
               else {"top_k": np.array([1, 2, 4, 8], np.int32)})
  out, stats = decode_sparse_attention(q, k, v, lengths, block_size=BLOCK, backend="interpret",
                                       return_stats=True, num_splits=num_splits, selection=selection, **rule_args)
  kept = np.asarray(stats.kept)
  np.testing.assert_array_equal(kept, _oracle_kept(q, k, lengths, **rule_args))
  _check_close(out, _oracle_attention(q, k, v, lengths, kept), jnp.float32)


def test_block_lists_put_the_kept_blocks_first():
  """`select_block_lists`: each row a permutation of the blocks; its first `counts` entries are the kept
  set (the forced blocks ascending, then the chosen candidates by descending block probability)."""
  q, k, _, lengths = _inputs(41, q_len=3, heads=4, kv_heads=2, lengths=(70, 128, 16))
  tau = np.array([1e-6, 0.5, 0.8, 1.0], np.float32)
  indices, counts, valid = select_block_lists(q, k, lengths, tau=jnp.asarray(tau), top_k=None, block_size=BLOCK,
                                              sm_scale=0.25)
  indices, counts = np.asarray(indices), np.asarray(counts)
  expected = _oracle_kept(q, k, lengths, tau=tau)
  means = np.asarray(key_block_means(k, lengths, BLOCK))
  q_mean = _f64(q).mean(axis=1)
  for b in range(3):
    length = int(lengths[b])
    forced = sorted({0, (length - 3) // BLOCK, (length - 1) // BLOCK})
    for h in range(4):
      row = indices[b, h]
      assert sorted(row.tolist()) == list(range(N_BLOCKS))
      assert set(row[:counts[b, h]].tolist()) == set(np.flatnonzero(expected[b, h]).tolist())
      assert row[:len(forced)].tolist() == forced
      scores = means[b, row[len(forced):counts[b, h]], h // 2] @ q_mean[b, h]
      assert np.all(np.diff(scores) <= 1e-6)                    # candidates by descending probability
  assert np.asarray(valid).sum() == 5 + 8 + 1


def test_suggested_num_splits_fills_the_gpu():
  assert suggested_num_splits(1, 9, 128) == 14      # SmolLM2 at batch 1, 8K: 9 programs -> 126
  assert suggested_num_splits(1, 32, 512) == 4      # Llama-2-7B at batch 1, 32K
  assert suggested_num_splits(8, 32, 512) == 1      # 256 programs already
  assert suggested_num_splits(8, 9, 128) == 1       # 72 programs: at least half of 132, no split
  assert suggested_num_splits(1, 1, 8) == 2         # at least 4 blocks per split
  assert suggested_num_splits(1, 1, 4096) == 16
  with pytest.raises(ValueError, match="must be >= 1"):
    suggested_num_splits(0, 9, 128)


# ----------------------------------------------------------------------------------------------------
# The in-kernel selection's pieces (kernels.decode_select_triton), outside the kernel.


def test_order_keys_sort_like_the_floats():
  values = np.array([-np.inf, -3e38, -2.0, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 2.0, 3e38, np.inf],
                    np.float32)
  keys = np.asarray(order_keys(jnp.asarray(values)))
  assert np.all(np.diff(keys)[np.diff(values) > 0] > 0)        # strictly where the floats are
  assert keys[5] == -1 and keys[6] == 0                          # −0 just below +0: one step, not equal
  shuffled = np.random.default_rng(0).permutation(values)
  np.testing.assert_array_equal(np.sort(shuffled), shuffled[np.argsort(np.asarray(order_keys(jnp.asarray(shuffled))))])


def test_kept_threshold_keeps_the_candidates_with_too_little_mass_above():
  scores = jnp.asarray([3.0, 1.0, 2.0, 0.0, 5.0], jnp.float32)
  weights = jnp.asarray([0.5, 0.1, 0.3, 0.1, 9.0], jnp.float32)
  candidate = jnp.asarray([True, True, True, True, False])     # the 5.0 is forced: not counted
  keys = order_keys(scores)
  kept = lambda target: np.asarray(candidate & (keys >= kept_threshold(keys, candidate, weights, target)))
  # Mass above each candidate: 3.0 → 0, 2.0 → 0.5, 1.0 → 0.8, 0.0 → 0.9.
  np.testing.assert_array_equal(kept(jnp.float32(0.6)), [True, False, True, False, False])
  np.testing.assert_array_equal(kept(jnp.float32(0.5)), [True, False, False, False, False])  # 0.5 is not < 0.5
  np.testing.assert_array_equal(kept(jnp.float32(1e-9)), [True, False, False, False, False])
  np.testing.assert_array_equal(kept(jnp.float32(2.0)), [True, True, True, True, False])
  ones = candidate.astype(jnp.int32)
  for k, expected in ((1, [1, 0, 0, 0, 0]), (3, [1, 1, 1, 0, 0]), (9, [1, 1, 1, 1, 0])):
    np.testing.assert_array_equal(candidate & (keys >= kept_threshold(keys, candidate, ones, jnp.int32(k))),
                                  np.asarray(expected, bool))
  none = jnp.zeros(5, bool)                                        # no candidate: nothing chosen
  assert not np.any(np.asarray(none & (keys >= kept_threshold(keys, none, weights, jnp.float32(0.5)))))


@pytest.mark.parametrize("rule", [{"top_k": 1}, {"tau": 0.3}], ids=["top_k1", "tau0.3"])
def test_in_kernel_selection_keeps_exactly_tied_blocks_together(rule):
  # Blocks 2 and 5 hold the same keys (the best ones), so their scores tie exactly: the sort keeps one
  # (block 2, by index) for top-k 1 or τ 0.3, the in-kernel threshold keeps both: the documented difference.
  q, k, v, lengths = _inputs(51, q_len=1, heads=1, kv_heads=1, lengths=(128,))
  k = np.array(k)
  k[0, 2 * BLOCK:3 * BLOCK] = k[0, 5 * BLOCK:6 * BLOCK] = 3.0 * np.asarray(q)[0, 0]
  k = jnp.asarray(k)
  kept = {selection: np.asarray(decode_sparse_attention(q, k, v, lengths, block_size=BLOCK, backend="interpret",
                                                        return_stats=True, selection=selection, **rule)[1].kept)[0, 0]
          for selection in SELECTIONS}
  np.testing.assert_array_equal(np.flatnonzero(kept["lists"]), [0, 2, N_BLOCKS - 1])
  np.testing.assert_array_equal(np.flatnonzero(kept["in_kernel"]), [0, 2, 5, N_BLOCKS - 1])
  np.testing.assert_array_equal(kept["pallas_lists"], kept["in_kernel"])   # one rule, two kernels


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("rule", [{"top_k": 2}, {"tau": 0.6}, {"tau": 1.0}], ids=["top_k2", "tau0.6", "tau1"])
def test_selection_kernel_lists_the_oracles_blocks_kept_first(rule, backend):
  # Ragged rows (one inside the first block) and GQA; heads get their own budgets.
  heads = 4
  q, k, _, lengths = _inputs(61, q_len=3, heads=heads, kv_heads=2, lengths=(128, 70, 9))
  budget = np.arange(1, heads + 1) * next(iter(rule.values())) / (1 if "top_k" in rule else heads)
  budget = np.minimum(budget, 1.0) if "tau" in rule else budget.astype(np.int32)
  scores = block_scores(q, key_block_means(k, lengths, BLOCK), 1 / math.sqrt(q.shape[-1]))   # the oracle's scale
  indices, counts = select_lists_triton(scores, jnp.asarray(budget), lengths, rule=next(iter(rule)), q_len=3,
                                        block_size=BLOCK, interpret=backend == "interpret")
  indices, counts = np.asarray(indices), np.asarray(counts)
  arg = {next(iter(rule)): budget}
  expected = _oracle_kept(q, k, lengths, **arg)
  for b in range(indices.shape[0]):
    for h in range(heads):
      row, count = indices[b, h], counts[b, h]
      kept = np.flatnonzero(expected[b, h])
      assert count == len(kept)
      np.testing.assert_array_equal(row[:count], kept)                      # kept first, ascending
      np.testing.assert_array_equal(np.sort(row), np.arange(N_BLOCKS))      # a permutation
      np.testing.assert_array_equal(row[count:], np.setdiff1d(np.arange(N_BLOCKS), kept))
