"""Query-row chunking: the same masks and outputs as the unchunked baselines, at bounded memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afbs_jax.baselines as baselines
from afbs_jax.baselines import budget, chunks, h2o, layout, sparsity
from tests.baselines import _oracles, _unchunked

TOKEN = ("h2o", "topk_token", "reformer", "routing")
CHUNKED = (*TOKEN, "topk_block")   # Every baseline that builds token-level [batch, heads, rows, S] arrays.
# (T, S, query_chunk): ragged multi-chunk, T < S, T > S (rows that see nothing). test_patterns and
# test_policies run the default chunk (one chunk, padded at T = 100).
CASES = [(200, 200, 64), (130, 200, 32), (72, 40, 16)]
old_select = jax.jit(_unchunked.select, static_argnums=(0, 3, 4))
old_attend = jax.jit(_unchunked.attend, static_argnums=(0, 4))


def test_the_chunked_set_is_every_token_level_baseline():
  levels = {name: baselines.get(name, sparsity=0.5).granularity for name in baselines.NAMES}
  assert {name for name, level in levels.items() if level == "token"} == set(TOKEN)
  for name in CHUNKED:
    assert baselines.get(name, sparsity=0.5, query_chunk=16).query_chunk == 16
  with pytest.raises(ValueError, match="query_chunk must be a power of two >= 16; got 24"):
    baselines.get("h2o", sparsity=0.5, query_chunk=24)


def _tied_scores(rng, shape):
  """Scores with many exact ties, signed zeros, infinities and NaNs."""
  pool = np.array([0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan, 1e-30, -1e-30])
  return np.where(rng.random(shape) < 0.7, rng.choice(pool, shape), rng.integers(-3, 3, shape))


def test_keep_top_equals_the_double_argsort():
  rng = np.random.default_rng(0)
  rows, cols = 24, 40
  new, old = (jax.jit(keep_top) for keep_top in (budget.keep_top, _unchunked.keep_top))
  for _ in range(3):
    valid = rng.random((rows, cols)) < 0.8
    forced = valid & (rng.random((rows, cols)) < 0.1)
    counts = np.array([rng.integers(0, n + 1) for n in valid.sum(1)])
    score = _tied_scores(rng, (2, 3, rows, cols))
    for dtype in (np.float64, np.float32):   # numpy scores: a numpy mask
      np.testing.assert_array_equal(budget.keep_top(score.astype(dtype), valid, forced, counts),
                                    _unchunked.keep_top(score.astype(dtype), valid, forced, counts))
    args = (jnp.asarray(score, jnp.float32), valid, forced, counts)   # Narrower floats widen to f32 exactly.
    np.testing.assert_array_equal(new(*args), old(*args))


@pytest.mark.parametrize("q_len, kv_len", [(7, 9), (9, 7), (1, 5), (64, 64)])
def test_token_rows_and_valid_are_the_layout_at_block_1(q_len, kv_len):
  grid = layout.layout(q_len, kv_len, 1)
  available, forced = layout.token_rows(q_len, kv_len)
  np.testing.assert_array_equal(available, grid.valid.sum(1))
  np.testing.assert_array_equal(forced, grid.diagonal.sum(1))
  np.testing.assert_array_equal(layout.token_valid(q_len, kv_len), grid.valid)
  np.testing.assert_array_equal(np.asarray(layout.token_valid(q_len, kv_len, jnp)), grid.valid)


@pytest.mark.parametrize("q_len, kv_len, query_chunk", CASES)
def test_chunk_geometry_is_the_layout(q_len, kv_len, query_chunk):
  grid = layout.layout(q_len, kv_len, 1)
  size = chunks.chunk_size(q_len, query_chunk)
  geometry = jax.jit(chunks.chunk_geometry, static_argnums=(1, 2, 3))
  for start in range(0, q_len, size):
    chunk = geometry(np.int32(start), size, q_len, kv_len, np.zeros(size, np.int32))
    real = slice(0, min(size, q_len - start))
    rows = slice(start, start + size)
    np.testing.assert_array_equal(np.asarray(chunk.valid)[real], grid.valid[rows])
    np.testing.assert_array_equal(np.asarray(chunk.diagonal)[real], grid.diagonal[rows])
    np.testing.assert_array_equal(np.asarray(chunk.distance)[real], grid.distance[rows])
    assert not np.asarray(chunk.valid)[real.stop:].any()


def test_earlier_mass_is_the_exclusive_cumulative_sum():
  probs = jnp.asarray(np.random.default_rng(0).random((2, 3, 64, 40)), jnp.float32)
  carry = jnp.asarray(np.random.default_rng(1).random((2, 3, 40)), jnp.float32)
  mass, last = jax.jit(h2o.earlier_mass)(probs, carry)
  expected = np.asarray(carry, np.float64)[:, :, None] + np.cumsum(np.asarray(probs, np.float64), axis=2)
  np.testing.assert_allclose(mass[:, :, 1:], expected[:, :, :-1], rtol=1e-6)
  np.testing.assert_array_equal(mass[:, :, 0], carry)
  np.testing.assert_allclose(last, expected[:, :, -1], rtol=1e-6)


@pytest.mark.parametrize("name, q_len, kv_len, query_chunk",
                         [(name, *CASES[0]) for name in CHUNKED]
                         + [("h2o", *CASES[2]), ("topk_block", *CASES[1])])
def test_chunked_selection_equals_the_unchunked_one(name, q_len, kv_len, query_chunk):
  q, k, _ = _oracles.random_qkv(3, batch=1, q_len=q_len, kv_len=kv_len)
  policy = baselines.get(name, sparsity=0.7, block_size=16, query_chunk=query_chunk)
  block = 1 if name in TOKEN else policy.block_size
  expected = np.asarray(old_select(policy, q, k, block, 1))
  got = policy.token_mask(q, k, layer=1) if block == 1 else policy.block_mask(q, k, layer=1)
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("name", TOKEN)
def test_jitted_attend_equals_the_unchunked_one(name):
  # GQA 4 / 2, batch 2, T < S, ragged at 16 rows. Outputs within 1e-6 and exactly the same sparsity mean
  # the same mask (one key more or less moves an output far more).
  q, k, v = _oracles.random_qkv(4, batch=2, q_len=150, kv_len=170)
  old_out, old_sparsity = old_attend(baselines.get(name, sparsity=0.6), q, k, v, 2)
  policy = baselines.get(name, sparsity=0.6, query_chunk=16)
  out, got_sparsity = jax.jit(lambda q, k, v: policy.attend(q, k, v, layer=2))(q, k, v)
  np.testing.assert_allclose(out, old_out, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(got_sparsity, old_sparsity)


def test_sparsity_measures_equal_the_int32_ones():
  mask = jnp.asarray(np.random.default_rng(0).random((2, 3, 100, 40)) < 0.3)   # ragged tiles, T > S
  np.testing.assert_array_equal(sparsity.block_sparsity(mask, 16), _unchunked.block_sparsity(mask, 16))
  np.testing.assert_array_equal(sparsity.token_sparsity(mask), _unchunked.token_sparsity(mask))


MEMORY_LEN, MEMORY_CHUNK, MEMORY_HEADS = 2048, 64, 9


@pytest.mark.parametrize("name", CHUNKED)
def test_jitted_attend_holds_one_chunk_of_rows_at_a_time(name):
  # SmolLM2's heads (9 query, 3 kv, head_dim 64) at T = S = 2048: one f32 [heads, T, S] array is 151 MB,
  # one chunk's [heads, 64, S] 4.7 MB. Unchunked, a layer's temporaries were about 5 of the former (760
  # MB); chunked, about 5-7 of the latter, plus a few O(T · heads · head_dim) arrays.
  q = jax.ShapeDtypeStruct((1, MEMORY_LEN, MEMORY_HEADS, 64), jnp.float32)
  k = jax.ShapeDtypeStruct((1, MEMORY_LEN, 3, 64), jnp.float32)
  policy = baselines.get(name, sparsity=0.9, query_chunk=MEMORY_CHUNK, backend="reference")
  compiled = jax.jit(lambda q, k, v: policy.attend(q, k, v, layer=0)).lower(q, k, k).compile()
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    stats = None
  if stats is None or getattr(stats, "temp_size_in_bytes", None) is None:
    pytest.skip("no memory analysis on this backend")
  chunk_array = MEMORY_CHUNK * MEMORY_LEN * MEMORY_HEADS * 4
  full_array = MEMORY_LEN * MEMORY_LEN * MEMORY_HEADS * 4
  assert stats.temp_size_in_bytes < 10 * chunk_array < full_array / 3, stats.temp_size_in_bytes
