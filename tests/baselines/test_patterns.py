"""Each baseline's selection against an independent numpy construction of the same rule."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import afbs_jax.baselines as baselines
from kernels import sparge
from tests.baselines import _oracles

SHAPES = [(128, 128), (64, 128), (100, 100)]   # square, decode-like T < S, partial last block
TOL = 1e-5                                      # f32 scores vs the float64 oracle near a cut


@pytest.mark.parametrize("name", sorted(_oracles.PATTERNS))
@pytest.mark.parametrize("q_len, kv_len", SHAPES)
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_fixed_pattern_matches_brute_force(name, q_len, kv_len, target):
  q, k, _ = _oracles.random_qkv(q_len=q_len, kv_len=kv_len)
  block_mask = np.asarray(baselines.get(name, sparsity=target, block_size=16).block_mask(q, k))
  n_k = math.ceil(kv_len / 16)
  expected = _oracles.ranked_pattern(_oracles.PATTERNS[name](n_k), q_len, kv_len, 16, target)
  for head_mask in block_mask.reshape(-1, *expected.shape):
    np.testing.assert_array_equal(head_mask, expected)


def test_window_literal():
  q, k, _ = _oracles.random_qkv(q_len=64, heads=1, kv_heads=1)
  # 10 valid blocks, round(0.5 · 10) = 5 kept: the diagonal, then one more on the last row.
  mask = np.asarray(baselines.get("window", sparsity=0.5, block_size=16).block_mask(q, k))[0, 0]
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def _check_row_top(mask, score, forced, counts, valid):
  """Every row keeps its forced cells and exactly its budget, and no dropped cell beats a kept one."""
  for row_mask, row_score, row_forced, count, row_valid in zip(mask, score, forced, counts, valid):
    assert row_mask.sum() == count and np.all(row_mask[row_forced]) and not np.any(row_mask & ~row_valid)
    chosen, dropped = row_mask & ~row_forced, ~row_mask & row_valid
    if chosen.any() and dropped.any():
      assert row_score[chosen].min() >= row_score[dropped].max() - TOL


def _selection(name: str, target: float, q_len: int, kv_len: int, block: int):
  """The baseline's selection on random inputs, one [rows, cols] mask per (batch, head), with the oracle's
  geometry and row budgets: (q, k, masks, valid, distance, diagonal, counts)."""
  q, k, _ = _oracles.random_qkv(q_len=q_len, kv_len=kv_len)
  policy = baselines.get(name, sparsity=target, block_size=max(block, 16))
  mask = policy.token_mask(q, k) if block == 1 else policy.block_mask(q, k)
  valid, distance, diagonal = _oracles.geometry(q_len, kv_len, block)
  counts = _oracles.budgets(valid.sum(1), diagonal.sum(1), target)
  return q, k, np.asarray(mask).reshape(-1, *valid.shape), valid, distance, diagonal, counts


def _true_probs(q, k) -> np.ndarray:
  """float64 causal attention probabilities, one [T, S] per (batch, head)."""
  q_len, kv_len = q.shape[1], k.shape[1]
  return _oracles.softmax_probs(q, k, _oracles.causal(q_len, kv_len)).reshape(-1, q_len, kv_len)


@pytest.mark.parametrize("q_len, kv_len", SHAPES)
def test_topk_token_is_the_top_of_true_attention(q_len, kv_len):
  q, k, masks, valid, _, diagonal, counts = _selection("topk_token", 0.7, q_len, kv_len, 1)
  for head_mask, head_logits in zip(masks, _oracles.logits(q, k).reshape(-1, q_len, kv_len)):
    _check_row_top(head_mask, head_logits, diagonal, counts, valid)


@pytest.mark.parametrize("q_len, kv_len", SHAPES)
def test_topk_block_is_the_top_of_true_block_mass(q_len, kv_len):
  q, k, masks, valid, _, diagonal, counts = _selection("topk_block", 0.6, q_len, kv_len, 16)
  probs = _true_probs(q, k)
  rows, cols = valid.shape
  padded = np.zeros((probs.shape[0], rows * 16, cols * 16))
  padded[:, :q_len, :kv_len] = probs
  mass = padded.reshape(-1, rows, 16, cols, 16).sum(axis=(2, 4))
  for head_mask, head_mass in zip(masks, mass):
    _check_row_top(head_mask, head_mass, diagonal, counts, valid)


@pytest.mark.parametrize("q_len, kv_len", SHAPES)
def test_h2o_keeps_recent_keys_and_earlier_queries_heavy_hitters(q_len, kv_len):
  q, k, masks, valid, distance, _, counts = _selection("h2o", 0.7, q_len, kv_len, 1)
  recent = valid & (distance < np.ceil(counts / 2)[:, None])
  probs = _true_probs(q, k)
  accumulated = np.cumsum(probs, axis=1) - probs             # query t: mass from queries t' < t only
  for head_mask, head_mass in zip(masks, accumulated):
    _check_row_top(head_mask, head_mass, recent, counts, valid)


def test_h2o_ignores_the_current_and_later_queries():
  # Changing the last query's vector must leave every earlier row's selection unchanged.
  q, k, _ = _oracles.random_qkv(q_len=64, kv_len=128)
  policy = baselines.get("h2o", sparsity=0.7)
  before = np.asarray(policy.token_mask(q, k))
  after = np.asarray(policy.token_mask(q.at[:, -1].set(10.0), k))
  np.testing.assert_array_equal(before[..., :-1, :], after[..., :-1, :])


@pytest.mark.parametrize("name", ["reformer", "routing"])
def test_hashing_and_clustering_keep_aligned_keys_first(name):
  # Queries all point along +e1; keys alternate +e1 / -e1 (antipodal keys never share an LSH bucket or
  # a spherical cluster). Wherever a row keeps an anti-aligned key besides its own position, it must
  # keep every aligned key it can see.
  q, k, _ = _oracles.random_qkv(q_len=64, kv_len=128)
  e1 = np.eye(q.shape[-1])[0]
  sign = np.where(np.arange(128) % 2 == 0, 1.0, -1.0)[None, :, None, None]
  q = jnp.asarray(np.abs(np.asarray(q[..., :1])) * e1, jnp.float32)
  k = jnp.asarray(sign * np.abs(np.asarray(k[..., :1])) * e1, jnp.float32)
  mask = np.asarray(baselines.get(name, sparsity=0.6).token_mask(q, k)).reshape(-1, 64, 128)
  visible = _oracles.causal(64, 128)
  aligned = (sign[0, :, 0, 0] > 0) & visible
  others = ~aligned & visible & ~_oracles.geometry(64, 128, 1)[2]
  own_aligned = aligned[np.arange(64), np.arange(64) + 64]
  for head_mask in mask:
    keeps_other = (head_mask & others).any(axis=1)
    assert keeps_other.any() and np.all(head_mask[keeps_other] | ~aligned[keeps_other])
    # Every slot the budget leaves after the query's own key goes to aligned keys while any are left.
    np.testing.assert_array_equal((head_mask & aligned).sum(1),
                                  np.minimum(aligned.sum(1), head_mask.sum(1) - ~own_aligned))


def test_sparge_global_uses_one_tau_the_smallest_that_meets_the_target():
  q, k, _ = _oracles.random_qkv(q_len=64, kv_len=128)
  policy = baselines.get("sparge_global", sparsity=0.6, block_size=16)
  tau = float(policy.fit_tau(q, k))
  expected = sparge.predict_block_mask(q, k, sparge.SpargeParams(tau=tau, theta=-1.0), block_q=16, block_k=16)
  np.testing.assert_array_equal(np.asarray(policy.block_mask(q, k)), np.asarray(expected))
  valid = _oracles.geometry(64, 128, 16)[0]
  density = lambda t: np.asarray(policy.mask_at(q, k, jnp.float32(t)))[..., valid].mean()
  assert density(tau) >= 0.4 > density(tau - 2.0**-20)
