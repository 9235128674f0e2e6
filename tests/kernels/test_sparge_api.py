"""The public sparge API: end-to-end semantics, statistics, backend dispatch, validation and recompilation."""

from __future__ import annotations

import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse, sparge, sparge_mask
from kernels.block_index import mask_to_kv_indices
from kernels.sparge import (SpargeParams, block_sparse_attention, predict_block_mask, sparge_attention,
                            sparge_attention_reference)
from kernels.sparge_reference import block_sparse_attention_reference
from tests.kernels import _oracles

# One shape for most tests (GQA 4/2, ragged, causal T > S) so the jitted pieces compile once.
BATCH, Q_LEN, KV_LEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2, 70, 50, 4, 2, 8, 16
N_Q, N_K = math.ceil(Q_LEN / BLOCK), math.ceil(KV_LEN / BLOCK)
BLOCKS = dict(block_q=BLOCK, block_k=BLOCK)


def _qkv(seed=0, sink=4.0):
  return _oracles.random_qkv(seed, batch=BATCH, q_len=Q_LEN, kv_len=KV_LEN, heads=HEADS, kv_heads=KV_HEADS,
                             head_dim=HEAD_DIM, sink=sink)


def _params(tau, theta, lam):
  return SpargeParams(*(jnp.broadcast_to(jnp.asarray(x, jnp.float32), (HEADS,)) for x in (tau, theta, lam)))


def _causal_valid():
  return sparge_mask.causal_block_mask(Q_LEN, KV_LEN, causal=True, block_q=BLOCK, block_k=BLOCK)


def test_sparge_attention_matches_block_skip_oracle_on_its_mask():
  q, k, v = _qkv()
  params = _params([0.3, 0.6, 0.8, 0.95], [0.2, 0.4, -1.0, 0.9], [-6.0, -3.0, -1.0, -0.5])
  out, stats = sparge_attention(q, k, v, params, return_stats=True, **BLOCKS)
  mask = np.asarray(predict_block_mask(q, k, params, **BLOCKS))
  expected, skipped = _oracles.block_skip_attention(q, k, v, mask, np.asarray(params.lam), causal=True,
                                                    **BLOCKS)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats.density), mask.sum(axis=(2, 3)) / _causal_valid().sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats.pv_skipped), skipped.sum(-1) / mask.sum(axis=(2, 3)),
                             rtol=1e-6)
  assert np.asarray(stats.density).min() < 1.0 and np.asarray(stats.pv_skipped).max() > 0.0
  np.testing.assert_array_equal(np.asarray(sparge_attention_reference(q, k, v, params, **BLOCKS)),
                                np.asarray(out))


def test_dense_end_equals_dense_attention():
  q, k, v = _qkv(sink=0.0)
  out, stats = sparge_attention(q, k, v, _params(1.0, 1.0, -jnp.inf), return_stats=True, **BLOCKS)
  np.testing.assert_allclose(np.asarray(out), _oracles.dense_attention(q, k, v, causal=True), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(stats.density), 1.0)
  np.testing.assert_array_equal(np.asarray(stats.pv_skipped), 0.0)


def test_stats_on_a_hand_built_mask():
  q, k, v = _qkv()
  valid = _causal_valid()             # [n_q, n_k]; causal T > S: q block 0 sees no key
  mask = np.zeros((BATCH, HEADS, N_Q, N_K), dtype=bool)
  mask[0, 0] = True                   # every block, causal-invalid ones included (ANDed out)
  mask[0, 1, :, 0] = True             # the first key block only
  mask[1, 2, 3, 1:] = True            # one row, two blocks
  _, stats = block_sparse_attention(q, k, v, mask, lam=-1.0, return_stats=True, **BLOCKS)
  kept = (mask & valid).sum(axis=(2, 3))
  np.testing.assert_allclose(np.asarray(stats.density), kept / valid.sum(), rtol=1e-6)
  assert np.asarray(stats.density)[0, 0] == 1.0 and np.asarray(stats.density)[1, 3] == 0.0
  _, skipped = block_sparse_attention_reference(q, k, v, jnp.asarray(mask & valid), jnp.full(HEADS, -1.0),
                                                causal=True, sm_scale=1 / math.sqrt(HEAD_DIM), **BLOCKS)
  skipped = np.asarray(skipped).sum(-1)
  np.testing.assert_allclose(np.asarray(stats.pv_skipped), np.where(kept > 0, skipped / np.maximum(kept, 1), 0),
                             rtol=1e-6)
  assert skipped[0, 0] > 0 and skipped[0, 1] == 0  # a row's first computed block never skips


def test_lam_none_means_no_skip():
  q, k, v = _qkv()
  mask = np.ones((BATCH, HEADS, N_Q, N_K), dtype=bool)
  out_none, stats = block_sparse_attention(q, k, v, mask, return_stats=True, **BLOCKS)
  out_inf = block_sparse_attention(q, k, v, mask, lam=-jnp.inf, **BLOCKS)
  np.testing.assert_array_equal(np.asarray(out_none), np.asarray(out_inf))
  np.testing.assert_array_equal(np.asarray(stats.pv_skipped), 0.0)


def test_sparsity_moves_the_documented_way_with_each_knob():
  """Lower τ, lower θ -> lower density; λ closer to 0 -> more P·V skipped."""
  q, k, v = _qkv()
  def stats(tau, theta, lam):
    return sparge_attention(q, k, v, _params(tau, theta, lam), return_stats=True, **BLOCKS)[1]
  density_by_tau = [float(stats(t, -1.0, -jnp.inf).density.mean()) for t in (0.0, 0.5, 0.9, 1.0)]
  density_by_theta = [float(stats(0.5, t, -jnp.inf).density.mean()) for t in (-1.0, 0.3, 0.6, 1.0)]
  skipped_by_lam = [float(stats(1.0, -1.0, lam).pv_skipped.mean()) for lam in (-jnp.inf, -6.0, -2.0, 0.0)]
  for series in (density_by_tau, density_by_theta, skipped_by_lam):
    assert np.all(np.diff(series) >= 0) and series[-1] > series[0]


def test_empty_rows_are_exact_zeros():
  q, k, v = _qkv()
  out = np.asarray(sparge_attention(q, k, v, _params(0.5, 0.5, -1.0), **BLOCKS))
  assert not np.isnan(out).any()
  np.testing.assert_array_equal(out[:, :Q_LEN - KV_LEN], 0.0)  # causal T > S: these rows see no key
  mask = np.ones((BATCH, HEADS, N_Q, N_K), dtype=bool)
  mask[1, 3, 2] = False
  out = np.asarray(block_sparse_attention(q, k, v, mask, **BLOCKS))
  np.testing.assert_array_equal(out[1, 2 * BLOCK:3 * BLOCK, 3], 0.0)


def test_traced_params_do_not_recompile():
  q, k, v = _qkv()
  traces = []
  @jax.jit
  def attend(params):
    traces.append(None)  # runs once per trace, not per call
    return sparge_attention(q, k, v, params, return_stats=True, **BLOCKS)
  densities = [float(attend(_params(tau, tau, -tau))[1].density.mean()) for tau in (0.1, 0.5, 0.9)]
  assert len(traces) == 1
  assert densities[0] < densities[-1]  # the values really reached the computation
  # Eager calls with new values reuse the compiled predictor and attention too.
  sparge_attention(q, k, v, _params(0.2, 0.2, -2.0), **BLOCKS)
  sizes = (sparge_mask.predict_block_mask._cache_size(), block_sparse._attend._cache_size())
  sparge_attention(q, k, v, _params(0.7, 0.1, -0.5), **BLOCKS)
  assert (sparge_mask.predict_block_mask._cache_size(), block_sparse._attend._cache_size()) == sizes


def _fake_kernel_module(calls):
  def kernel(q, k, v, kv_indices, kv_counts, lam, *, causal, block_q, block_k, sm_scale, interpret=False):
    calls.append(dict(kv_indices=kv_indices, kv_counts=kv_counts, lam=lam, causal=causal, block_q=block_q,
                      block_k=block_k, sm_scale=sm_scale, interpret=interpret))
    return jnp.zeros_like(q), jnp.zeros(kv_counts.shape, jnp.int32)
  return types.SimpleNamespace(block_sparse_attention_triton=kernel, block_sparse_attention_mosaic=kernel)


@pytest.mark.parametrize("backend, module", [("interpret", "kernels.block_sparse_triton"),
                                             ("mosaic", "kernels.block_sparse_mosaic")])
def test_backend_seam_receives_causal_anded_indices(monkeypatch, backend, module):
  calls = []
  monkeypatch.setitem(sys.modules, module, _fake_kernel_module(calls))
  q, k, v = _qkv()
  mask = np.random.default_rng(0).random((BATCH, HEADS, N_Q, N_K)) < 0.5
  with jax.disable_jit():  # concrete arguments, and no cached trace of the fake kernel
    block_sparse_attention(q, k, v, mask, lam=-3.0, backend=backend, sm_scale=0.25, **BLOCKS)
  (call,) = calls
  indices, counts = mask_to_kv_indices(jnp.asarray(mask & _causal_valid()))
  np.testing.assert_array_equal(np.asarray(call["kv_indices"]), np.asarray(indices))
  np.testing.assert_array_equal(np.asarray(call["kv_counts"]), np.asarray(counts))
  np.testing.assert_array_equal(np.asarray(call["lam"]), np.full(HEADS, -3.0, np.float32))
  assert call["lam"].dtype == jnp.float32
  assert (call["causal"], call["block_q"], call["block_k"], call["sm_scale"]) == (True, BLOCK, BLOCK, 0.25)
  assert call["interpret"] is (jax.default_backend() != "tpu" if backend == "mosaic" else True)


def test_missing_kernel_module_raises_not_implemented(monkeypatch):
  monkeypatch.setitem(sys.modules, "kernels.block_sparse_triton", None)
  q, k, v = _qkv()
  with pytest.raises(NotImplementedError, match="block_sparse_triton"):
    sparge_attention(q, k, v, _params(0.5, 0.5, -1.0), backend="interpret", **BLOCKS)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised off-GPU")
def test_triton_backend_needs_a_gpu():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="GPU"):
    sparge_attention(q, k, v, _params(0.5, 0.5, -1.0), backend="triton", **BLOCKS)


def _bad_call(q=None, k=None, v=None, params=None, **kwargs):
  good_q, good_k, good_v = _qkv()
  q = good_q if q is None else q
  k = good_k if k is None else k
  v = good_v if v is None else v
  params = _params(0.5, 0.5, -1.0) if params is None else params
  sparge_attention(q, k, v, params, **{**BLOCKS, **kwargs})


_Q, _K, _V = _qkv()
BAD_INPUTS = [
    ("q", dict(q=_Q[0])),                                              # rank 3
    ("k", dict(k=_K[:1])),                                             # batch mismatch
    ("k", dict(k=_K[..., :4])),                                        # head_dim mismatch
    ("v", dict(v=_V[:, :40])),                                         # S of v != S of k
    ("q", dict(q=_Q.astype(jnp.int32))),                               # not floating
    ("kv_heads", dict(q=_Q[:, :, :3])),                                # 3 heads over 2 kv heads
    ("params.tau", dict(params=SpargeParams(jnp.full(3, 0.5), 0.5, -1.0))),
    ("params.theta", dict(params=SpargeParams(0.5, jnp.full((HEADS, 1), 0.5), -1.0))),
    ("params.tau", dict(params=SpargeParams(jnp.array([0.5, np.nan, 0.5, 0.5]), 0.5, -1.0))),
    ("params.theta", dict(params=SpargeParams(0.5, np.nan, -1.0))),
    ("params.lam", dict(params=SpargeParams(0.5, 0.5, np.nan))),
    ("params.tau", dict(params=SpargeParams(1.5, 0.5, -1.0))),
    ("params.lam", dict(params=SpargeParams(0.5, 0.5, 0.5))),
    ("params", dict(params=(0.5, 0.5, -1.0))),
    ("block_q", dict(block_q=48)),
    ("block_k", dict(block_k=8)),
    ("backend", dict(backend="cuda")),
    ("sm_scale", dict(sm_scale=-1.0)),
]


@pytest.mark.parametrize("name, change", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_inputs_raise_value_error_naming_the_argument(name, change):
  with pytest.raises(ValueError, match=name.replace(".", r"\.")):
    _bad_call(**change)


@pytest.mark.parametrize("mask_shape", [(BATCH, HEADS, N_Q, N_K + 1), (BATCH, KV_HEADS, N_Q, N_K)])
def test_bad_mask_shape_raises(mask_shape):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="mask"):
    block_sparse_attention(q, k, v, np.ones(mask_shape, dtype=bool), **BLOCKS)


def test_bad_lam_raises():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="lam"):
    block_sparse_attention(q, k, v, np.ones((BATCH, HEADS, N_Q, N_K), dtype=bool), lam=jnp.zeros(3),
                           **BLOCKS)


def test_params_broadcast_and_traced_values_skip_value_checks():
  q, k, v = _qkv()
  scalar = sparge_attention(q, k, v, SpargeParams(tau=0.5, theta=0.5, lam=-1.0), **BLOCKS)
  per_head = sparge_attention(q, k, v, _params(0.5, 0.5, -1.0), **BLOCKS)
  np.testing.assert_array_equal(np.asarray(scalar), np.asarray(per_head))
  # Under jit the NaN cannot be seen before tracing; the call must trace without raising.
  jax.jit(lambda p: sparge_attention(q, k, v, p, **BLOCKS)).lower(_params(0.5, np.nan, -1.0))


def test_traced_invalid_thresholds_fall_back_to_exact_attention_and_are_flagged():
  """Under jit τ/θ/λ cannot be checked: an invalid head computes dense attention and is flagged."""
  q, k, v = _oracles.random_qkv(11, q_len=Q_LEN, kv_len=KV_LEN, heads=HEADS, kv_heads=KV_HEADS,
                                head_dim=HEAD_DIM)
  # Head 0 valid and sparse; head 1 τ NaN; head 2 θ NaN; head 3 λ > 0 (would skip nearly every P·V).
  tau = jnp.asarray([0.3, np.nan, 0.3, 0.3])
  theta = jnp.asarray([0.0, 0.0, np.nan, 0.0])
  lam = jnp.asarray([-np.inf, -np.inf, -np.inf, 2.0])
  run = jax.jit(lambda tau, theta, lam: sparge_attention(
      q, k, v, SpargeParams(tau=tau, theta=theta, lam=lam), backend="reference", return_stats=True, **BLOCKS))
  out, stats = run(tau, theta, lam)
  np.testing.assert_array_equal(np.asarray(stats.invalid_params), [False, True, True, True])
  dense = _oracles.dense_attention(q, k, v, causal=True)
  # Heads 1 and 2 keep every block; head 3's invalid λ became -inf: its mask alone decides, no P·V skip.
  for head in (1, 2):
    np.testing.assert_allclose(np.asarray(out)[:, :, head], dense[:, :, head], atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.density)[:, head], 1.0)
  np.testing.assert_array_equal(np.asarray(stats.pv_skipped)[:, 3], 0.0)
  assert float(np.asarray(stats.density)[:, 0].mean()) < 1.0   # the valid head stays sparse
  valid_lam = run(tau, theta, lam.at[3].set(-np.inf))[0]
  np.testing.assert_array_equal(np.asarray(out)[:, :, 3], np.asarray(valid_lam)[:, :, 3])
