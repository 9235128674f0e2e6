"""The jnp reference against float64 numpy oracles: dense attention, and brute-force block skipping."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sparge_reference import block_sparse_attention_reference
from tests.kernels import _oracles

# (q_len, kv_len, heads, kv_heads, block_q, block_k, causal, dtype): square, GQA 4/2 and 9/3, T < S,
# T > S, ragged lengths, 16/32 blocks, causal or not, f32 and bf16. Every call below reuses one of these
# shapes with batch 2 and an f32 [heads] λ, so the jitted reference compiles once per case.
CASES = [
    (64, 64, 4, 2, 16, 16, True, jnp.float32),
    (40, 72, 9, 3, 16, 32, True, jnp.float32),
    (72, 40, 4, 4, 32, 16, True, jnp.float32),
    (37, 45, 2, 1, 16, 16, False, jnp.float32),
    (33, 33, 3, 3, 32, 32, False, jnp.float32),
    (64, 64, 4, 2, 16, 16, False, jnp.bfloat16),
    (40, 72, 9, 3, 16, 32, True, jnp.bfloat16),
    (72, 40, 4, 4, 32, 16, True, jnp.bfloat16),
]
F32_CASES = [case for case in CASES if case[-1] == jnp.float32]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
HEAD_DIM = 8
BATCH = 2


def _inputs(case, seed, **kwargs):
  q_len, kv_len, heads, kv_heads, *_, dtype = case
  return _oracles.random_qkv(seed, batch=BATCH, q_len=q_len, kv_len=kv_len, heads=heads,
                             kv_heads=kv_heads, head_dim=HEAD_DIM, dtype=dtype, **kwargs)


def _full_mask(case):
  q_len, kv_len, heads, _, block_q, block_k, *_ = case
  return np.ones((BATCH, heads, math.ceil(q_len / block_q), math.ceil(kv_len / block_k)), dtype=bool)


def _lam(case, values):
  return jnp.broadcast_to(jnp.asarray(values, jnp.float32), (case[2],))


def _reference(case, q, k, v, mask, lam):
  *_, block_q, block_k, causal, _ = case
  return block_sparse_attention_reference(q, k, v, jnp.asarray(mask), lam, causal=causal, block_q=block_q,
                                          block_k=block_k, sm_scale=1.0 / math.sqrt(HEAD_DIM))


def _oracle(case, q, k, v, mask, lam):
  *_, block_q, block_k, causal, _ = case
  return _oracles.block_skip_attention(q, k, v, mask, lam, causal=causal, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("case", CASES)
def test_all_blocks_kept_equals_dense(case):
  q, k, v = _inputs(case, seed=0)
  out, pv_skipped = _reference(case, q, k, v, _full_mask(case), _lam(case, -jnp.inf))
  assert out.dtype == case[-1] and out.shape == q.shape
  expected = _oracles.dense_attention(q, k, v, causal=case[6])
  assert _oracles.relative_error(out, expected) <= TOLERANCE[case[-1]]
  assert int(pv_skipped.sum()) == 0


def test_lam_none_means_no_skip():
  case = CASES[0]
  q, k, v = _inputs(case, seed=0, sink=4.0)
  out_none, skipped_none = _reference(case, q, k, v, _full_mask(case), None)
  out_inf, _ = _reference(case, q, k, v, _full_mask(case), _lam(case, -jnp.inf))
  np.testing.assert_array_equal(np.asarray(out_none), np.asarray(out_inf))
  assert int(skipped_none.sum()) == 0


@pytest.mark.parametrize("case", F32_CASES)
def test_matches_brute_force_block_skip(case):
  q, k, v = _inputs(case, seed=1, sink=4.0)
  mask = np.random.default_rng(2).random(_full_mask(case).shape) < 0.8
  lam = _lam(case, np.linspace(-5.0, -0.5, case[2]))  # a different λ for every head
  out, pv_skipped = _reference(case, q, k, v, mask, lam)
  expected_out, expected_skipped = _oracle(case, q, k, v, mask, np.asarray(lam))
  np.testing.assert_allclose(np.asarray(out), expected_out, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(pv_skipped), expected_skipped)
  # The comparison only means something if λ really skipped blocks, more on heads with λ closer to 0.
  per_head = expected_skipped.sum(axis=(0, 2))
  assert per_head[-1] > 0 and per_head[-1] >= per_head[0]


def test_skip_sets_are_nested_in_lambda():
  case = CASES[0]
  q, k, v = _inputs(case, seed=3, sink=4.0)
  counts = []
  for lam in [-jnp.inf, -8.0, -4.0, -2.0, -1.0, -0.25, 0.0]:
    _, pv_skipped = _reference(case, q, k, v, _full_mask(case), _lam(case, lam))
    counts.append(np.asarray(pv_skipped))
  for looser, tighter in zip(counts, counts[1:]):
    assert np.all(tighter >= looser)
  assert counts[0].sum() == 0 and counts[-1].sum() > counts[2].sum() > 0


def test_skip_changes_only_q_blocks_with_skipped_blocks():
  case = CASES[0]
  block_q = case[4]
  q, k, v = _inputs(case, seed=4, sink=4.0)
  dense_out, _ = _reference(case, q, k, v, _full_mask(case), _lam(case, -jnp.inf))
  sparse_out, pv_skipped = _reference(case, q, k, v, _full_mask(case), _lam(case, -2.0))
  # [batch, heads, n_q_blocks] -> [batch, T, heads]: True where the row's q block skipped something.
  row_skipped = np.repeat(np.asarray(pv_skipped) > 0, block_q, axis=2).transpose(0, 2, 1)
  changed = np.any(np.asarray(sparse_out) != np.asarray(dense_out), axis=-1)
  assert row_skipped.any() and not row_skipped.all()
  assert not np.any(changed & ~row_skipped)
  assert np.any(changed & row_skipped)


@pytest.mark.parametrize("lam", [-jnp.inf, -1.0])
def test_empty_rows_output_exact_zero(lam):
  case = CASES[2]  # causal, T = 72 > S = 40, block_q = 32
  q_len, kv_len, _, _, block_q, *_ = case
  q, k, v = _inputs(case, seed=5, sink=4.0)
  mask = _full_mask(case)
  mask[0, 1, 1, :] = False  # batch 0, head 1, q block 1: nothing kept
  out = np.asarray(_reference(case, q, k, v, mask, _lam(case, lam))[0])
  assert not np.isnan(out).any()
  # Causal with T > S: queries t < T - S see no key at all.
  np.testing.assert_array_equal(out[:, :q_len - kv_len], 0.0)
  np.testing.assert_array_equal(out[0, block_q:2 * block_q, 1], 0.0)
  assert np.all(np.abs(out[:, q_len - kv_len:, 0]).sum(axis=-1) > 0)
