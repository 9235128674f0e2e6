"""The Triton-path Pallas kernel (interpret mode, CPU) against the jnp reference and the float64 oracle."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_index import mask_to_kv_indices
from kernels import block_sparse_triton
from kernels.block_sparse_triton import block_sparse_attention_triton
from kernels.sparge_reference import block_sparse_attention_reference
from tests.kernels import _oracles

# (q_len, kv_len, heads, kv_heads, head_dim, block_q, block_k): square and ragged, T < S and T > S,
# MHA and GQA (4/2, 9/3), block_q above, equal to and below block_k.
SHAPES = [
    (64, 64, 4, 4, 16, 16, 16),
    (80, 96, 4, 2, 32, 16, 32),
    (90, 50, 9, 3, 16, 32, 16),
]
# Per-head λ (natural log): -inf never skips; values near 0 skip often on peaky rows.
LAMBDAS = (-np.inf, -0.5, -2.0, -np.inf, -0.25, -1.0, -4.0, -0.1, -np.inf)


def _random_block_mask(seed: int, *, heads: int, q_len: int, kv_len: int, causal: bool, block_q: int,
                       block_k: int, keep: float = 0.6) -> np.ndarray:
  """bool [1, heads, n_q, n_k]: random kept blocks ANDed with causal validity; head 0 row 0 is empty."""
  valid = _oracles.causal_valid_blocks(q_len, kv_len, causal, block_q, block_k)
  rng = np.random.default_rng(seed)
  mask = (rng.random((1, heads) + valid.shape) < keep) & valid
  mask[0, 0, 0] = False
  return mask


def _run_kernel(q, k, v, mask, lam, *, causal, block_q, block_k):
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))
  return block_sparse_attention_triton(q, k, v, indices, counts, jnp.asarray(lam, jnp.float32),
                                       causal=causal, block_q=block_q, block_k=block_k,
                                       sm_scale=1.0 / math.sqrt(q.shape[-1]), interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_S{}_H{}_K{}_D{}_bq{}_bk{}".format(*s))
def test_kernel_matches_reference(shape, causal, dtype):
  q_len, kv_len, heads, kv_heads, head_dim, block_q, block_k = shape
  q, k, v = _oracles.random_qkv(sum(shape), q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, dtype=dtype, scale=2.0)
  mask = _random_block_mask(q_len + kv_len, heads=heads, q_len=q_len, kv_len=kv_len, causal=causal,
                            block_q=block_q, block_k=block_k)
  lam = np.asarray(LAMBDAS[:heads], np.float32)

  out, pv_skipped = _run_kernel(q, k, v, mask, lam, causal=causal, block_q=block_q, block_k=block_k)
  ref_out, ref_skipped = block_sparse_attention_reference(
      q, k, v, jnp.asarray(mask), jnp.asarray(lam), causal=causal, block_q=block_q, block_k=block_k,
      sm_scale=1.0 / math.sqrt(head_dim))

  assert out.shape == q.shape and out.dtype == q.dtype
  assert pv_skipped.shape == mask.shape[:3] and pv_skipped.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(pv_skipped), np.asarray(ref_skipped))
  out, ref_out = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (out, ref_out))
  assert np.isfinite(out).all()
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
  else:
    assert _oracles.relative_error(out, ref_out) <= 2e-2
  # The empty row outputs exact zeros.
  np.testing.assert_array_equal(out[0, :block_q, 0], 0.0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_skip_path_matches_float64_oracle(causal):
  """A planted sink key block sets a high running max, so later blocks skip; counts match the oracle."""
  q_len, kv_len, heads, kv_heads, head_dim, block_q, block_k = 96, 96, 4, 2, 16, 16, 16
  q, k, v = _oracles.random_qkv(7, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim)
  # Every query leans on one direction that only a few keys of block 0 carry, with varying strength,
  # so Δ of later blocks spreads over a range of values around the λs below.
  sink = np.zeros(head_dim, np.float32)
  sink[0] = 1.0
  q = q + 6.0 * sink
  k = k.at[:, :8].add(np.linspace(1.0, 4.0, 8)[:, None, None] * sink)
  mask = _random_block_mask(3, heads=heads, q_len=q_len, kv_len=kv_len, causal=causal, block_q=block_q,
                            block_k=block_k, keep=1.0)
  lam = np.asarray([-0.5, -2.0, -np.inf, -4.0], np.float32)

  out, pv_skipped = _run_kernel(q, k, v, mask, lam, causal=causal, block_q=block_q, block_k=block_k)
  oracle_out, oracle_skipped = _oracles.block_skip_attention(q, k, v, mask, lam, causal=causal,
                                                             block_q=block_q, block_k=block_k)

  pv_skipped = np.asarray(pv_skipped)
  np.testing.assert_array_equal(pv_skipped, oracle_skipped)
  assert pv_skipped[:, :2].sum() > 10, "λ near 0 behind a sink block should skip many blocks"
  assert pv_skipped[:, 2].sum() == 0, "λ = -inf never skips"
  np.testing.assert_allclose(np.asarray(out), oracle_out, atol=1e-5, rtol=0)


def test_all_kept_equals_dense_attention():
  """Every causal-valid block kept and no skip is plain causal attention (T > S: early rows are empty)."""
  q_len, kv_len, heads, head_dim, block = 72, 40, 2, 32, 16
  q, k, v = _oracles.random_qkv(11, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=heads,
                                head_dim=head_dim)
  mask = np.broadcast_to(_oracles.causal_valid_blocks(q_len, kv_len, True, block, block),
                         (1, heads, 5, 3))
  out, pv_skipped = _run_kernel(q, k, v, mask, np.full(heads, -np.inf), causal=True, block_q=block,
                                block_k=block)
  np.testing.assert_allclose(np.asarray(out), _oracles.dense_attention(q, k, v, causal=True), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out)[0, :q_len - kv_len], 0.0)
  assert int(pv_skipped.sum()) == 0


def test_lambda_free_variant_matches_reference():
  """The variant compiled without the λ test (run on GPU when every λ is -inf) computes the same."""
  q_len, kv_len, heads, kv_heads, head_dim, block_q, block_k = 80, 96, 4, 2, 16, 32, 16
  q, k, v = _oracles.random_qkv(5, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim)
  mask = _random_block_mask(5, heads=heads, q_len=q_len, kv_len=kv_len, causal=True, block_q=block_q,
                            block_k=block_k)
  lam = jnp.full((heads,), -jnp.inf)
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))
  out, pv_skipped = block_sparse_triton._block_sparse_forward(  # pylint: disable=protected-access
      q, k, v, indices, counts, lam, causal=True, block_q=block_q, block_k=block_k,
      sm_scale=1.0 / math.sqrt(head_dim), interpret=True,
      config=block_sparse_triton.LaunchConfig(num_warps=4, num_stages=2), pv_skip=False)
  ref_out, _ = block_sparse_attention_reference(q, k, v, jnp.asarray(mask), lam, causal=True,
                                                block_q=block_q, block_k=block_k,
                                                sm_scale=1.0 / math.sqrt(head_dim))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=0)
  assert int(pv_skipped.sum()) == 0


@pytest.mark.parametrize("bad, match", [
    (dict(block_q=24), "block_q must be a power of two"),
    (dict(kv_indices_blocks=3), "kv_indices must be"),
    (dict(lam_heads=3), "lam must be"),
])
def test_rejects_inconsistent_inputs(bad, match):
  q, k, v = _oracles.random_qkv(0, q_len=32, kv_len=32, heads=2, kv_heads=1, head_dim=16)
  block_q = bad.get("block_q", 16)
  indices = jnp.zeros((1, 2, math.ceil(32 / block_q), bad.get("kv_indices_blocks", 2)), jnp.int32)
  counts = jnp.ones((1, 2, math.ceil(32 / block_q)), jnp.int32)
  lam = jnp.zeros((bad.get("lam_heads", 2),), jnp.float32)
  with pytest.raises(ValueError, match=match):
    block_sparse_attention_triton(q, k, v, indices, counts, lam, causal=True, block_q=block_q,
                                  block_k=16, sm_scale=0.25, interpret=True)
