"""Tests of LayerEvaluator against a direct computation on random Q/K/V (reference kernel backend)."""

from __future__ import annotations

import numpy as np
import pytest

from afbs_jax.attention import SpargeMethod
from afbs_jax.tuner import LatentMap
from afbs_jax.tuner import evaluator as evaluator_lib
from kernels.block_config import BlockSparseConfig

NUM_INPUTS, T_HIGH, HEADS, KV_HEADS, HEAD_DIM, BLOCK, LOW_LEN = 3, 64, 4, 2, 16, 16, 32


def _activations(seed: int = 0):
  """Random Q/K/V whose tokens cluster per block, as real activations do, so blocks can be pruned.

  Independent Gaussian tokens would have block self-similarity near 0, below every θ, and SpargeAttn would
  (rightly) compute every block.
  """
  rng = np.random.default_rng(seed)

  def clustered(heads, scale):
    centres = rng.normal(size=(NUM_INPUTS, T_HIGH // BLOCK, 1, heads, HEAD_DIM))
    tokens = np.broadcast_to(centres, (NUM_INPUTS, T_HIGH // BLOCK, BLOCK, heads, HEAD_DIM))
    noise = 0.3 * rng.normal(size=tokens.shape)
    return (scale * (tokens + noise)).reshape(NUM_INPUTS, T_HIGH, heads, HEAD_DIM).astype(np.float32)

  v = rng.normal(size=(NUM_INPUTS, T_HIGH, KV_HEADS, HEAD_DIM)).astype(np.float32)
  return clustered(HEADS, 1.0), clustered(KV_HEADS, 1.0), v


# Wider than the default map: on these small synthetic activations the default τ ≥ 0.8 may prune nothing,
# and the comparisons below need the aggressive end to drop blocks.
LATENT = LatentMap(tau_min=0.5, theta_min=0.1, theta_max=1.0)
# (At low fidelity, 2 blocks, the sink column plus the top-1 block keep everything, so that case runs
# without the sink.)

def _evaluator(attention_sink=True, block_size=BLOCK, **overrides):
  q, k, v = _activations()
  blocks = BlockSparseConfig.square(block_size, backend="reference")
  options = dict(low_len=LOW_LEN, latent=LATENT, method=SpargeMethod(attention_sink=attention_sink),
                 blocks=blocks) | overrides
  return evaluator_lib.LayerEvaluator(q, k, v, **options)


def _dense_numpy(q, k, v):
  """Causal softmax attention in float64 with GQA; q: [T, H, D], k, v: [T, K, D] -> [T, H, D]."""
  length, heads, dim = q.shape
  group = heads // k.shape[1]
  k = np.repeat(k, group, axis=1).astype(np.float64)
  v = np.repeat(v, group, axis=1).astype(np.float64)
  logits = np.einsum("thd,uhd->htu", q.astype(np.float64), k) / np.sqrt(dim)
  logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("htu,uhd->thd", weights, v)


def _direct(s, fidelity, input_index, attention_sink=True):
  """Error and sparsity computed without the evaluator: kernel call + float64 dense attention."""
  from kernels import sparge  # pylint: disable=g-import-not-at-top
  q, k, v = _activations()
  length = LOW_LEN if fidelity == "low" else T_HIGH
  q, k, v = (x[input_index:input_index + 1, :length] for x in (q, k, v))
  out, stats = sparge.sparge_attention(q, k, v, LATENT.to_params(np.asarray(s, np.float32)), causal=True,
                                       block_q=BLOCK, block_k=BLOCK, backend="reference", return_stats=True,
                                       attention_sink=attention_sink)
  out = np.asarray(out, np.float64)[0]
  dense = _dense_numpy(q[0], k[0], v[0])
  error = np.abs(out - dense).sum(axis=(0, 2)) / np.abs(dense).sum(axis=(0, 2))
  return error, np.clip(1.0 - np.asarray(stats.density, np.float64)[0], 0.0, 1.0)


@pytest.mark.parametrize("fidelity, input_index, attention_sink",
                         [("low", 0, False), ("high", 0, True), ("high", 2, True), ("high", 2, False)])
def test_matches_direct_computation(fidelity, input_index, attention_sink):
  evaluator = _evaluator(attention_sink=attention_sink)
  s = np.array([0.0, 0.3, 0.7, 1.0], np.float32)
  error, sparsity = evaluator(s, fidelity, input_index)
  expected_error, expected_sparsity = _direct(s, fidelity, input_index, attention_sink)
  assert error.shape == sparsity.shape == (HEADS,)
  np.testing.assert_allclose(error, expected_error, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sparsity, expected_sparsity, atol=1e-6)
  # The aggressive end must actually prune and cost accuracy, or the comparison above proves little.
  assert sparsity[-1] > 0.0 and error[-1] > 1e-3


def test_s_zero_is_dense():
  evaluator = _evaluator()
  for fidelity in ("low", "high"):
    error, sparsity = evaluator(np.zeros(HEADS, np.float32), fidelity, 1)
    np.testing.assert_allclose(error, 0.0, atol=1e-5)
    np.testing.assert_array_equal(sparsity, 0.0)


def test_evaluate_params_matches_latent_call():
  evaluator = _evaluator()
  s = np.array([0.2, 0.4, 0.6, 0.9], np.float32)
  tau, theta, lam = LATENT.to_arrays(s)
  by_s = evaluator(s, "high", 1)
  by_params = evaluator.evaluate_params({"tau": tau, "theta": theta, "lam": lam}, "high", 1)
  np.testing.assert_array_equal(by_s[0], by_params[0])
  np.testing.assert_array_equal(by_s[1], by_params[1])


def test_no_recompilation_across_s():
  evaluator = _evaluator()
  evaluator(np.full(HEADS, 0.5, np.float32), "low", 0)
  evaluator(np.full(HEADS, 0.5, np.float32), "high", 1)
  compiled = evaluator_lib._error_and_sparsity._cache_size()  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  for _ in range(4):
    evaluator(rng.uniform(size=HEADS).astype(np.float32), "low", 0)
    evaluator(rng.uniform(size=HEADS).astype(np.float32), "high", int(rng.integers(0, NUM_INPUTS)))
  assert evaluator_lib._error_and_sparsity._cache_size() == compiled  # pylint: disable=protected-access


def test_counters_and_dense_cache():
  evaluator = _evaluator()
  for s in (0.1, 0.5, 0.9):
    evaluator(np.full(HEADS, s, np.float32), "low", 0)
  evaluator(np.full(HEADS, 0.5, np.float32), "high", 1)
  low, high = evaluator.counters["low"], evaluator.counters["high"]
  assert (low.launches, low.head_evaluations, low.tokens) == (3, 3 * HEADS, 3 * LOW_LEN)
  assert (high.launches, high.head_evaluations, high.tokens) == (1, HEADS, T_HIGH)
  assert (low.dense_launches, high.dense_launches) == (1, 1)  # Dense output computed once per input.
  assert low.wall_time_s > 0.0
  totals = evaluator.totals()
  assert totals["launches"] == 4 and totals["head_evaluations"] == 4 * HEADS


@pytest.mark.parametrize("call, match", [
    (lambda e: e(np.zeros(3, np.float32), "low", 0), "s must have shape"),
    (lambda e: e(np.zeros(HEADS, np.float32), "medium", 0), "fidelity must be one of"),
    (lambda e: e(np.zeros(HEADS, np.float32), "high", NUM_INPUTS), "input_index must be"),
])
def test_bad_calls_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call(_evaluator())


@pytest.mark.parametrize("overrides, match", [({"low_len": 0}, "low_len"), ({"low_len": T_HIGH + 1}, "low_len"),
                                              ({"block_size": 0}, "block_q must be a power of two"),
                                              ({"blocks": 64}, "blocks must be a BlockSparseConfig"),
                                              ({"method": "sparge"}, "method must be an AttentionMethod")])
def test_bad_construction_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    _evaluator(**overrides)
