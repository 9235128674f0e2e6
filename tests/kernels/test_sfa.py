"""Sparse Feature Attention: the jnp reference against numpy oracles, the Pallas kernels against it.

The reference (`kernels.sfa_reference`) is checked against float64 numpy (top-k by a stable argsort, then
plain masked softmax attention) and against finite differences (straight-through gradients are the true
derivative away from ties). Both kernel forms of `kernels.sfa` run in interpret mode and must match the
reference in value and in gradient; each case packs GQA, ragged T and S and a padded head_dim into one
compilation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sfa import SFA_BACKEND_NAMES, resolve_backend, sfa_attention
from kernels.sfa_reference import sfa_attention_reference, top_k_codes, top_k_mask
from tests.kernels import _oracles

KERNEL_BACKENDS = ("interpret", "interpret_codes") + (
    ("triton", "triton_codes") if jax.default_backend() == "gpu" else ())
# T < S with block_q < block_k, causal, GQA; T > S with block_q > block_k, MHA, full attention. head_dim 12
# is padded to 16 by the kernels.
CASES = {
    "causal_gqa": dict(q_len=40, kv_len=72, heads=4, kv_heads=2, head_dim=12, k_q=4, k_k=6, causal=True,
                       block_q=16, block_k=32),
    "full": dict(q_len=50, kv_len=40, heads=2, kv_heads=2, head_dim=16, k_q=3, k_k=16, causal=False,
                 block_q=32, block_k=16),
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}   # max |error| / max |expected|
# XLA's CPU backend at optimisation level 0 compiles the interpret-mode programs about twice as fast.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_SHAPE_KEYS = ("q_len", "kv_len", "heads", "kv_heads", "head_dim")
_OPTION_KEYS = ("k_q", "k_k", "causal", "block_q", "block_k")
_reference = _jit(sfa_attention_reference, static_argnames=_OPTION_KEYS)


def _qkv(case, seed=0, dtype=jnp.float32):
  return _oracles.random_qkv(seed, dtype=dtype, **{key: case[key] for key in _SHAPE_KEYS})


def _options(case):
  return {key: case[key] for key in _OPTION_KEYS}


def _block_mask(case, seed=0):
  """A random block mask with one row (head 1, q block 0) that keeps nothing."""
  n_q, n_k = -(-case["q_len"] // case["block_q"]), -(-case["kv_len"] // case["block_k"])
  mask = np.random.default_rng(seed).random((1, case["heads"], n_q, n_k)) < 0.6
  mask[:, :, -1, -1] = True
  mask[0, 1, 0] = False
  return jnp.asarray(mask)


# ---------------------------------------------------------------------------------------- numpy oracle


def _np_sparsify(x, k: int) -> np.ndarray:
  """float64: each row's k largest |x| kept (ties: the lower index, as lax.top_k), the rest 0."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  order = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
  kept = np.zeros(x.shape, bool)
  np.put_along_axis(kept, order, True, axis=-1)
  return np.where(kept, x, 0.0)


def _np_sfa(q, k, v, *, k_q, k_k, causal, block_mask=None, block_q=64, block_k=64) -> np.ndarray:
  """float64 SFA: masked softmax attention over the sparsified q, k; rows with nothing allowed are 0."""
  q, k = _np_sparsify(q, k_q), _np_sparsify(k, k_k)
  v = np.asarray(jnp.asarray(v, jnp.float32), np.float64)
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
  allowed = np.broadcast_to(_oracles.unmasked_elements(q.shape[1], k.shape[1], causal), logits.shape)
  if block_mask is not None:
    blocks = np.asarray(block_mask)
    rows, cols = np.arange(q.shape[1]) // block_q, np.arange(k.shape[1]) // block_k
    allowed = allowed & blocks[:, :, rows][:, :, :, cols]
  logits = np.where(allowed, logits, -np.inf)
  row_max = logits.max(axis=-1, keepdims=True)
  weights = np.where(allowed, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  denominator = weights.sum(axis=-1, keepdims=True)
  probs = weights / np.where(denominator == 0, 1.0, denominator)
  return np.einsum("bhts,bshd->bthd", probs, v)


# ----------------------------------------------------------------------------------------- reference


def test_top_k_keeps_the_largest_magnitudes_ties_to_the_lower_index():
  x = jnp.asarray([[0.5, -2.0, 1.0, 2.0, -1.0]])
  np.testing.assert_array_equal(top_k_mask(x, 3), [[False, True, True, True, False]])
  indices, values = top_k_codes(x, 3)
  np.testing.assert_array_equal(indices, [[1, 3, 2]])
  np.testing.assert_array_equal(values, [[-2.0, 2.0, 1.0]])


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_numpy(name):
  case = CASES[name]
  q, k, v = _qkv(case)
  expected = _np_sfa(q, k, v, k_q=case["k_q"], k_k=case["k_k"], causal=case["causal"])
  actual = _reference(q, k, v, **_options(case))
  assert _oracles.relative_error(actual, expected) <= TOLERANCE[jnp.float32]
  mask = _block_mask(case)
  expected = _np_sfa(q, k, v, k_q=case["k_q"], k_k=case["k_k"], causal=case["causal"], block_mask=mask,
                     block_q=case["block_q"], block_k=case["block_k"])
  actual = _reference(q, k, v, block_mask=mask, **_options(case))
  assert _oracles.relative_error(actual, expected) <= TOLERANCE[jnp.float32]
  np.testing.assert_array_equal(np.asarray(actual[0, :case["block_q"], 1]), 0.0)   # the empty row


def test_keeping_every_feature_is_dense_attention():
  case = CASES["causal_gqa"]
  q, k, v = _qkv(case, seed=1)
  expected = _oracles.dense_attention(q, k, v, causal=True)
  d = case["head_dim"]
  assert _oracles.relative_error(_reference(q, k, v, k_q=d, k_k=d), expected) <= TOLERANCE[jnp.float32]
  assert _oracles.relative_error(_reference(q, k, v, k_q=2, k_k=2), expected) > 0.05


def test_reference_gradient_matches_finite_differences():
  """Straight-through = the true derivative where no |x| ties at the k-th place (margins >> eps here)."""
  rng = np.random.default_rng(0)

  def separated(shape):
    # Per row, a permutation of well-separated magnitudes with random signs: the selection cannot flip.
    magnitudes = np.linspace(0.4, 1.6, shape[-1])
    rows = np.stack([rng.permutation(magnitudes) for _ in range(math.prod(shape[:-1]))]).reshape(shape)
    return jnp.asarray(rows * rng.choice([-1.0, 1.0], shape), jnp.float32)

  q, k = separated((1, 3, 2, 6)), separated((1, 4, 1, 6))
  v = jnp.asarray(rng.standard_normal((1, 4, 1, 6)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  shapes = [x.shape for x in (q, k, v)]
  splits = np.cumsum([math.prod(shape) for shape in shapes])[:-1]

  def loss(flat):
    q, k, v = (part.reshape(shape) for part, shape in zip(jnp.split(flat, splits), shapes))
    return jnp.sum(weights * sfa_attention_reference(q, k, v, k_q=2, k_k=3, causal=True))

  flat = jnp.concatenate([x.ravel() for x in (q, k, v)])
  grad = _jit(jax.grad(loss))(flat)
  # Central differences along every coordinate at once: a batch of one-hot steps.
  eps = 1e-3
  steps = eps * jnp.eye(flat.size, dtype=flat.dtype)
  numeric = _jit(jax.vmap(lambda step: (loss(flat + step) - loss(flat - step)) / (2 * eps)))(steps)
  np.testing.assert_allclose(grad, numeric, atol=2e-3 * np.abs(numeric).max() + 1e-4)
  grads = [np.asarray(part).reshape(shape) for part, shape in zip(jnp.split(grad, splits), shapes)]
  # Dropped features get exactly zero.
  np.testing.assert_array_equal(np.asarray(grads[0])[~np.asarray(top_k_mask(q, 2))], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[1])[~np.asarray(top_k_mask(k, 3))], 0.0)


# ------------------------------------------------------------------------------------------- kernels


@functools.partial(_jit, static_argnames=("backend", "k_q", "k_k", "causal", "block_q", "block_k"))
def _kernel(q, k, v, block_mask, **options):
  return sfa_attention(q, k, v, block_mask=block_mask, **options)


@functools.partial(_jit, static_argnames=("backend", "k_q", "k_k", "causal", "block_q", "block_k"))
def _grads(q, k, v, block_mask, d_out, *, backend, **options):
  """(out, (dq, dk, dv)) of sum(out · d_out) through `sfa_attention` (backend "reference": jax.grad of it)."""
  def loss(q, k, v):
    if backend == "reference":
      out = sfa_attention_reference(q, k, v, block_mask=block_mask, **options)
    else:
      out = sfa_attention(q, k, v, block_mask=block_mask, backend=backend, **options)
    return jnp.sum(out.astype(jnp.float32) * d_out), out
  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_matches_reference(backend):
  """Without a block mask: non-causal, T > S (the causal GQA case runs with a mask, with gradients, below)."""
  case = CASES["full"]
  q, k, v = _qkv(case, seed=2)
  out = _kernel(q, k, v, None, backend=backend, **_options(case))
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _oracles.relative_error(out, sfa_attention_reference(q, k, v, **_options(case))) <= 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_keeping_every_feature_is_dense_attention(backend):
  case = dict(CASES["full"], k_q=16, k_k=16, causal=True)
  q, k, v = _qkv(case, seed=3)
  out = _kernel(q, k, v, None, backend=backend, **_options(case))
  assert _oracles.relative_error(out, _oracles.dense_attention(q, k, v, causal=True)) <= 1e-5
  assert np.abs(np.asarray(out[0, :case["q_len"] - case["kv_len"]])).max() == 0   # causal: rows see nothing


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_gradients_with_a_block_mask_match_the_reference(backend):
  """Forward and gradients under a block mask (one empty row), causal, GQA, ragged; dropped features 0."""
  case = CASES["causal_gqa"]
  q, k, v = _qkv(case, seed=4)
  mask = _block_mask(case, seed=4)
  d_out = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
  out, grads = _grads(q, k, v, mask, d_out, backend=backend, **_options(case))
  expected_out, expected = _grads(q, k, v, mask, d_out, backend="reference", **_options(case))
  assert _oracles.relative_error(out, expected_out) <= 1e-5
  for name, actual, wanted in zip(("dq", "dk", "dv"), grads, expected):
    assert np.abs(np.asarray(wanted)).max() > 0.1, name
    assert _oracles.relative_error(actual, wanted) <= 1e-5, name
  rows = slice(0, case["block_q"])
  np.testing.assert_array_equal(np.asarray(out[0, rows, 1]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0][0, rows, 1]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[~np.asarray(top_k_mask(q, case["k_q"]))], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[1])[~np.asarray(top_k_mask(k, case["k_k"]))], 0.0)
  # The mask matters: without it the output differs.
  assert _oracles.relative_error(out, sfa_attention_reference(q, k, v, **_options(case))) > 0.01


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bf16_kernel_matches_reference(backend):
  case = CASES["causal_gqa"]
  q, k, v = _qkv(case, seed=5, dtype=jnp.bfloat16)
  out = _kernel(q, k, v, None, backend=backend, **_options(case))
  assert out.dtype == jnp.bfloat16
  expected = sfa_attention_reference(q, k, v, **_options(case)).astype(jnp.float32)
  assert _oracles.relative_error(out, np.asarray(expected)) <= TOLERANCE[jnp.bfloat16]


# ------------------------------------------------------------------------------------- API and checks


def test_auto_is_the_reference_on_cpu_and_names_are_checked():
  assert resolve_backend("auto", "cpu").name == "reference"
  assert resolve_backend("auto", "gpu").name == "triton"
  assert set(SFA_BACKEND_NAMES) >= {"auto", "reference", "interpret", "interpret_codes", "triton"}
  with pytest.raises(ValueError, match="needs a GPU"):
    resolve_backend("triton_codes", "cpu")
  with pytest.raises(ValueError, match="backend must be one of"):
    resolve_backend("cuda", "cpu")


def _bad(**overrides):
  q, k, v = _oracles.random_qkv(0, q_len=8, kv_len=8, heads=2, kv_heads=1, head_dim=8)
  arguments = dict(q=q, k=k, v=v, k_q=2, k_k=2, backend="reference", block_q=16, block_k=16)
  arguments.update(overrides)
  return arguments


@pytest.mark.parametrize("overrides, message", [
    (dict(k_q=0), "k_q must be an int in"),
    (dict(k_k=9), "k_k must be an int in"),
    (dict(k_q=2.0), "k_q must be an int in"),
    (dict(k_k=True), "k_k must be an int in"),
    (dict(k=jnp.zeros((1, 8, 3, 8)), v=jnp.zeros((1, 8, 3, 8))), "multiple of k kv_heads"),
    (dict(q=jnp.zeros((1, 8, 2, 4))), "head_dim"),
    (dict(v=jnp.zeros((1, 8, 1, 8), jnp.bfloat16)), "one floating dtype"),
    (dict(q=jnp.zeros((1, 8, 2, 8), jnp.int32)), "floating dtype"),
    (dict(q=jnp.zeros((8, 2, 8))), "4-d"),
    (dict(causal=1), "causal must be a bool"),
    (dict(sm_scale=-1.0), "sm_scale"),
    (dict(block_q=24), "power of two"),
    (dict(backend="nope"), "backend must be one of"),
    (dict(block_mask=jnp.ones((1, 2, 1, 2), bool)), "mask must have shape"),
    (dict(block_mask=jnp.ones((1, 2, 1, 1), jnp.float32)), "mask must be bool"),
])
def test_bad_inputs_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    sfa_attention(**_bad(**overrides))
