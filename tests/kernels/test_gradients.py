"""Gradients through the block-sparse front door: the Pallas backward vs the VJP of the jnp reference.

The definition of a correct gradient is `jax.grad` of `kernels.block_sparse_reference` (mask and P·V-skip
decisions constant). Each case packs several properties into one compilation (GQA, ragged T and S, an
empty row, per-head λ that really skips), and checks that each property is exercised.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_index import causal_block_mask
from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse_reference import block_sparse_attention_reference
from kernels.sparge import SpargeParams, sparge_attention, sparge_attention_reference
from tests.kernels import _oracles

# On a GPU the Triton lowering of the same kernels is checked too.
KERNEL_BACKENDS = ("interpret",) + (("triton",) if jax.default_backend() == "gpu" else ())
HEADS, KV_HEADS = 4, 2
LAMBDAS = np.asarray([-np.inf, -0.5, -1.0, -2.0], np.float32)   # head 0 never skips
EMPTY_HEAD, EMPTY_Q_BLOCK = 1, 0                                   # a row with no kept block
# (q_len, kv_len, head_dim, block_q, block_k): T < S with block_q < block_k, and T > S with block_q > block_k
# and a head_dim that the kernels pad to a power of two.
CASES = {
    "causal": dict(causal=True, q_len=40, kv_len=72, head_dim=16, block_q=16, block_k=32),
    "full": dict(causal=False, q_len=50, kv_len=40, head_dim=12, block_q=32, block_k=16),
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}   # max |error| / max |expected|, per gradient
# XLA's CPU backend at optimisation level 0 compiles these interpret-mode programs about twice as fast; the
# arithmetic checked here does not depend on it.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(case, dtype, seed=0):
  """q, k, v with an attention sink (so that λ skips), d_out, and a random mask with one empty row."""
  q, k, v = _oracles.random_qkv(seed, q_len=case["q_len"], kv_len=case["kv_len"], heads=HEADS,
                                kv_heads=KV_HEADS, head_dim=case["head_dim"], dtype=dtype, sink=5.0)
  valid = causal_block_mask(case["q_len"], case["kv_len"], causal=case["causal"], block_q=case["block_q"],
                            block_k=case["block_k"])
  rng = np.random.default_rng(seed)
  mask = (rng.random((1, HEADS) + valid.shape) < 0.7) & valid
  mask[:, :, :, 0] = valid[:, 0]                         # the sink block, so that later blocks skip
  mask[0, EMPTY_HEAD, EMPTY_Q_BLOCK] = False
  d_out = jnp.asarray(rng.standard_normal(q.shape), dtype)
  return q, k, v, jnp.asarray(mask), d_out


def _statics(case):
  return dict(causal=case["causal"], block_q=case["block_q"], block_k=case["block_k"])


# Module-level jits, so that tests sharing a shape share one compilation.
@functools.partial(_jit, static_argnames=("backend", "causal", "block_q", "block_k"))
def _kernel_grads(q, k, v, mask, d_out, lam, *, backend, **statics):
  """out, pv_skipped stats and (dq, dk, dv, dλ) through `block_sparse_attention`."""
  def loss(q, k, v, lam):
    out, stats = block_sparse_attention(q, k, v, mask, lam=lam, backend=backend, return_stats=True,
                                        **statics)
    return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), (out, stats.pv_skipped)
  grads, (out, skipped) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, lam)
  return out, skipped, grads


@functools.partial(_jit, static_argnames=("causal", "block_q", "block_k"))
def _reference_grads(q, k, v, mask, d_out, lam, **statics):
  """dq, dk, dv: `jax.grad` of the jnp reference itself (no custom_vjp anywhere)."""
  def loss(q, k, v):
    out, _ = block_sparse_attention_reference(q, k, v, mask, lam, sm_scale=1.0 / math.sqrt(q.shape[-1]),
                                              **statics)
    return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(actual, expected, tolerance):
  for name, a, e in zip(("dq", "dk", "dv"), actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    assert np.isfinite(np.asarray(a, np.float32)).all(), name
    assert np.abs(np.asarray(e, np.float32)).max() > 0.1, f"{name} of the reference is trivially small"
    error = _oracles.relative_error(a, np.asarray(jnp.asarray(e, jnp.float32)))
    assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_kernel_gradients_match_reference_vjp(name, backend):
  case = CASES[name]
  q, k, v, mask, d_out = _inputs(case, jnp.float32)
  lam = jnp.asarray(LAMBDAS)
  out, skipped, (dq, dk, dv, dlam) = _kernel_grads(q, k, v, mask, d_out, lam, backend=backend,
                                                   **_statics(case))
  expected = _reference_grads(q, k, v, mask, d_out, lam, **_statics(case))
  _assert_close((dq, dk, dv), expected, TOLERANCE[jnp.float32])

  # λ really skipped blocks (never on head 0), and the skips change the gradient: a backward that
  # ignored them would fail the comparison above.
  skipped = np.asarray(skipped)
  assert skipped[:, 0].max() == 0 and skipped[:, 1:].max() > 0
  no_skip = _reference_grads(q, k, v, mask, d_out, jnp.full(HEADS, -jnp.inf), **_statics(case))
  for actual, other in zip((dq, dk, dv), no_skip):
    assert _oracles.relative_error(actual, np.asarray(other)) > 100 * TOLERANCE[jnp.float32]
  # The empty row: zero output and zero dq; λ gets a zero cotangent.
  rows = slice(EMPTY_Q_BLOCK * case["block_q"], (EMPTY_Q_BLOCK + 1) * case["block_q"])
  np.testing.assert_array_equal(np.asarray(out[0, rows, EMPTY_HEAD], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(dq[0, rows, EMPTY_HEAD], np.float32), 0.0)
  assert np.abs(np.asarray(dq[0, rows, EMPTY_HEAD + 1], np.float32)).max() > 0
  np.testing.assert_array_equal(np.asarray(dlam), 0.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bf16_gradients_match_the_f32_reference(backend):
  """bf16 tiles, f32 accumulation: within 2e-2 of the exact (f32) gradient of the same bf16 values."""
  case = CASES["causal"]
  q, k, v, mask, d_out = _inputs(case, jnp.bfloat16, seed=1)
  lam = jnp.asarray(LAMBDAS)
  _, skipped, grads = _kernel_grads(q, k, v, mask, d_out, lam, backend=backend, **_statics(case))
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  expected = _reference_grads(*upcast, mask, d_out.astype(jnp.float32), lam, **_statics(case))
  assert all(g.dtype == jnp.bfloat16 for g in grads[:3]) and np.asarray(skipped).max() > 0
  _assert_close([g.astype(jnp.float32) for g in grads[:3]], expected, TOLERANCE[jnp.bfloat16])


def test_mosaic_backend_uses_the_reference_vjp():
  """Backends without a backward kernel (Mosaic, the reference) differentiate through the reference's VJP."""
  case = CASES["causal"]
  q, k, v, mask, d_out = _inputs(case, jnp.float32, seed=2)
  lam = jnp.asarray(LAMBDAS)
  expected = _reference_grads(q, k, v, mask, d_out, lam, **_statics(case))
  _, _, grads = _kernel_grads(q, k, v, mask, d_out, lam, backend="mosaic", **_statics(case))
  _assert_close(grads[:3], expected, TOLERANCE[jnp.float32])


def test_sparge_attention_gradients_match_its_reference():
  """`sparge_attention` goes through the same front door: its gradient is that of the jnp pipeline."""
  q, k, v = _oracles.random_qkv(3, q_len=48, kv_len=48, heads=HEADS, kv_heads=KV_HEADS, head_dim=16,
                                sink=5.0)
  params = SpargeParams(tau=jnp.asarray([0.5, 0.7, 0.9, 0.6]), theta=jnp.asarray([0.3, -1.0, 0.5, 0.2]),
                        lam=jnp.asarray([-1.0, -0.5, -np.inf, -2.0]))
  d_out = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
  blocks = dict(block_q=16, block_k=16)

  def kernel_loss(q, k, v):
    out, stats = sparge_attention(q, k, v, params, backend="interpret", return_stats=True, **blocks)
    return jnp.sum(out * d_out), stats

  def reference_loss(q, k, v):
    return jnp.sum(sparge_attention_reference(q, k, v, params, **blocks) * d_out)
  actual, stats = _jit(jax.grad(kernel_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  expected = _jit(jax.grad(reference_loss, argnums=(0, 1, 2)))(q, k, v)
  _assert_close(actual, expected, TOLERANCE[jnp.float32])
  assert float(stats.density.mean()) < 1.0 and float(stats.pv_skipped.max()) > 0


def test_mask_prediction_is_outside_differentiation(monkeypatch):
  """The GPU predictor's fused Pallas pass (here interpreted) has no JVP: q and k reach it cut off."""
  from kernels import sparge_mask  # pylint: disable=g-import-not-at-top
  fused = functools.partial(sparge_mask._block_statistics, fused=True, interpret=True)
  monkeypatch.setattr(sparge_mask, "_block_statistics", lambda x, block, **kw: fused(x, block, **kw | {
      "fused": True, "interpret": True}))
  q, k, _ = _oracles.random_qkv(4, q_len=32, kv_len=32, heads=HEADS, kv_heads=KV_HEADS, head_dim=16)
  params = SpargeParams(tau=jnp.full((HEADS,), 0.5), theta=jnp.full((HEADS,), 0.2), lam=jnp.full((HEADS,), -1.0))

  def masked_sum(q, k):
    mask = sparge_mask.predict_block_mask(q, k, params, block_q=16, block_k=16)
    return jnp.sum(mask.astype(jnp.float32)) * jnp.sum(q) * jnp.sum(k)

  dq, dk = jax.grad(masked_sum, argnums=(0, 1))(q, k)
  kept = float(jnp.sum(sparge_mask.predict_block_mask(q, k, params, block_q=16, block_k=16)))
  assert kept > 0
  np.testing.assert_allclose(np.asarray(dq), kept * float(jnp.sum(k)), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(dk), kept * float(jnp.sum(q)), rtol=1e-4)
