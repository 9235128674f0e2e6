"""Bad values must not vanish: NaN/±inf inputs propagate as in dense attention, and dtype mixes raise.

`kernels.block_sparse_reference` documents the rule: once a q block meets a tile holding a non-finite value
it computes every kept tile (no P·V skip), with the arithmetic of dense softmax attention. With every
causal-valid block kept, each row of such a q block is therefore dense attention's row (NaN where dense
is NaN), and every other row is what the same call gives on clean inputs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse_triton
from kernels.block_index import causal_block_mask, mask_to_kv_indices
from kernels.block_sparse import block_sparse_attention
from kernels.sparge import SpargeParams, sparge_attention
from tests.kernels import _oracles

SEQ, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 64, 2, 1, 16, 16
LAMBDAS = jnp.asarray([-jnp.inf, -0.5])       # head 1 skips behind the attention sink
N_BLOCKS = SEQ // BLOCK
# On a GPU the Triton lowering is checked too (its max ignores NaN, unlike XLA's).
BACKENDS = ("reference", "interpret", "mosaic") + (("triton",) if jax.default_backend() == "gpu" else ())
# name -> (tensor, token, head, component, value): one bad element.
BAD = {
    "q_nan": ("q", 37, 1, 3, np.nan),
    "q_inf": ("q", 21, 0, 0, np.inf),
    "k_inf": ("k", 20, 0, 5, np.inf),
    "k_nan": ("k", 50, 0, 1, np.nan),
    "v_nan": ("v", 40, 0, 2, np.nan),
}


def _qkv():
  return _oracles.random_qkv(0, q_len=SEQ, kv_len=SEQ, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                             sink=4.0)


def _all_kept():
  valid = causal_block_mask(SEQ, SEQ, causal=True, block_q=BLOCK, block_k=BLOCK)
  return np.broadcast_to(valid, (1, HEADS) + valid.shape)


def _attend(q, k, v, backend):
  out, stats = block_sparse_attention(q, k, v, _all_kept(), lam=LAMBDAS, block_q=BLOCK, block_k=BLOCK,
                                      backend=backend, return_stats=True)
  return np.asarray(out), np.asarray(stats.pv_skipped)


# Finite outputs of poisoned rows are compared with dense attention: exact to float rounding on CPU; a GPU
# runs f32 matmuls in TF32 by default (≈1e-3 here). The NaN pattern and the clean rows stay exact.
FINITE_ATOL = 1e-5 if jax.default_backend() == "cpu" else 3e-3


def _dense(q, k, v):
  return np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True))


def _poisoned_rows(tensor: str, token: int, head: int) -> np.ndarray:
  """bool [SEQ, HEADS]: rows whose q block has a kept tile holding the bad element."""
  q_block = np.arange(SEQ) // BLOCK
  if tensor == "q":
    rows = (q_block == token // BLOCK)[:, None] & (np.arange(HEADS) == head)[None, :]
  else:  # a key's K or V: every q block that keeps its key block (all causal-valid ones), every head
    rows = np.broadcast_to((q_block >= token // BLOCK)[:, None], (SEQ, HEADS))
  return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BAD)
def test_bad_values_propagate_like_dense_attention(name, backend):
  tensor, token, head, component, value = BAD[name]
  qkv = dict(zip("qkv", _qkv()))
  clean, clean_skipped = _attend(*qkv.values(), backend)
  assert clean_skipped[0, 1] > 0, "head 1 must skip on clean inputs, or the test proves nothing"
  qkv[tensor] = qkv[tensor].at[0, token, head, component].set(value)
  out, _ = _attend(*qkv.values(), backend)
  dense = _dense(*qkv.values())

  poisoned = _poisoned_rows(tensor, token, head)[None, :, :, None]
  expected = np.where(poisoned, dense, clean)
  assert np.isnan(out).any(), "the bad value vanished"
  np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
  finite = ~np.isnan(expected)
  np.testing.assert_allclose(out[finite], expected[finite], atol=FINITE_ATOL, rtol=0)
  # Rows that never read the bad value are exactly the clean ones.
  np.testing.assert_array_equal(np.where(poisoned, 0.0, out), np.where(poisoned, 0.0, clean))


@pytest.mark.parametrize("interpret", (True,) + ((False,) if jax.default_backend() == "gpu" else ()))
@pytest.mark.parametrize("name", ["q_nan", "k_inf", "v_nan"])
def test_lambda_free_variant_propagates_too(name, interpret):
  """The kernel compiled without the λ test (the GPU's path when every λ = -inf) keeps NaN rows NaN."""
  tensor, token, head, component, value = BAD[name]
  qkv = dict(zip("qkv", _qkv()))
  qkv[tensor] = qkv[tensor].at[0, token, head, component].set(value)
  indices, counts = mask_to_kv_indices(jnp.asarray(_all_kept()))
  out, _ = block_sparse_triton._block_sparse_forward(  # pylint: disable=protected-access
      *qkv.values(), indices, counts, jnp.full((HEADS,), -jnp.inf), causal=True, block_q=BLOCK,
      block_k=BLOCK, sm_scale=1.0 / math.sqrt(HEAD_DIM), interpret=interpret,
      config=block_sparse_triton.LaunchConfig(num_warps=4, num_stages=2), pv_skip=False)
  # Every kept tile is computed, so every row that reads the bad value is dense attention's row.
  expected = np.where(_poisoned_rows(tensor, token, head)[None, :, :, None], _dense(*qkv.values()),
                      _dense(*_qkv()))
  out = np.asarray(out)
  assert np.isnan(expected).any()
  np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
  np.testing.assert_allclose(out[~np.isnan(expected)], expected[~np.isnan(expected)], atol=FINITE_ATOL, rtol=0)


@pytest.mark.parametrize("which", ["k", "v"])
def test_mixed_dtypes_raise_a_clear_error(which):
  q, k, v = _qkv()
  qkv = dict(q=q, k=k, v=v)
  qkv[which] = qkv[which].astype(jnp.bfloat16)
  given = ", ".join(f"{name} {x.dtype}" for name, x in qkv.items())
  with pytest.raises(ValueError, match=f"q, k, v must share one floating dtype .*; got {given}"):
    block_sparse_attention(*qkv.values(), _all_kept(), block_q=BLOCK, block_k=BLOCK)
  with pytest.raises(ValueError, match="must share one floating dtype"):
    sparge_attention(*qkv.values(), SpargeParams(tau=0.5, theta=0.5), block_q=BLOCK, block_k=BLOCK)
