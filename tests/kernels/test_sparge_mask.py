"""The mask predictor against a brute-force numpy version of SpargeAttn's rules, and its invariants."""

from __future__ import annotations

import math
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sparge import SpargeParams
from kernels.sparge_mask import (_block_statistics, _top_cdf, _top_cdf_causal_square, causal_block_mask,
                                 predict_block_mask)
from tests.kernels import _oracles

HEAD_DIM = 8


def _clustered(rng, batch, length, heads, block):
  """Tokens drawn around one direction per block, with a strength that varies by block.

  Strong blocks have a self-similarity near 1, weak ones near 1/block, so a θ grid splits them.
  """
  n_blocks = math.ceil(length / block)
  centres = rng.uniform(0.0, 3.0, (batch, n_blocks, heads, 1)) * rng.standard_normal(
      (batch, n_blocks, heads, HEAD_DIM))
  noise = rng.standard_normal((batch, length, heads, HEAD_DIM))
  return noise + np.repeat(centres, block, axis=1)[:, :length]


def _inputs(seed, *, q_len, kv_len, heads, kv_heads, block_q, block_k, batch=2):
  rng = np.random.default_rng(seed)
  q = _clustered(rng, batch, q_len, heads, block_q)
  k = _clustered(rng, batch, kv_len, kv_heads, block_k)
  return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def _blocks(x, block):
  return [x[start:start + block] for start in range(0, len(x), block)]


def _mean_pairwise_cosine(tokens):
  norms = np.linalg.norm(tokens, axis=-1)
  cosine = np.zeros((len(tokens), len(tokens)))
  for a in range(len(tokens)):
    for b in range(len(tokens)):
      if norms[a] > 0 and norms[b] > 0:
        cosine[a, b] = tokens[a] @ tokens[b] / (norms[a] * norms[b])
  return cosine.mean()


def _predict_numpy(q, k, tau, theta, *, causal, block_q, block_k, attention_sink=False):
  """SpargeAttn's prediction rules, one (batch, head, q block) row at a time, in float64."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  tau, theta = np.broadcast_to(tau, (heads,)), np.broadcast_to(theta, (heads,))
  k = k - k.mean(axis=1, keepdims=True)
  valid = _oracles.causal_valid_blocks(q_len, kv_len, causal, block_q, block_k)
  mask = np.zeros((batch, heads) + valid.shape, dtype=bool)
  for b in range(batch):
    for h in range(heads):
      q_blocks = _blocks(q[b, :, h], block_q)
      k_blocks = _blocks(k[b, :, h // (heads // kv_heads)], block_k)
      q_similar = [_mean_pairwise_cosine(x) > theta[h] for x in q_blocks]
      k_similar = np.array([_mean_pairwise_cosine(x) > theta[h] for x in k_blocks])
      for i, q_block in enumerate(q_blocks):
        allowed = valid[i] & k_similar
        if allowed.any():
          scores = np.array([q_block.mean(0) @ x.mean(0) / math.sqrt(head_dim) for x in k_blocks])
          weights = np.where(allowed, np.exp(scores - scores[allowed].max()), 0.0)
          probs = weights / weights.sum()
          descending = np.sort(probs)[::-1]
          n_keep = max(1, int(np.sum(np.cumsum(descending) <= tau[h])))
          mask[b, h, i] = allowed if tau[h] >= 1 else probs >= descending[n_keep - 1]
        mask[b, h, i] |= ~k_similar
        if not q_similar[i]:
          mask[b, h, i] = True
        if attention_sink:
          mask[b, h, i, 0] = True
        mask[b, h, i] &= valid[i]
  return mask


def _predict(q, k, tau, theta, *, causal, block_q, block_k, attention_sink=False):
  # Always [heads] arrays, so every call on one shape shares a compilation.
  heads = q.shape[2]
  params = SpargeParams(tau=jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (heads,)),
                        theta=jnp.broadcast_to(jnp.asarray(theta, jnp.float32), (heads,)))
  return np.asarray(predict_block_mask(q, k, params, causal=causal, block_q=block_q, block_k=block_k,
                                       attention_sink=attention_sink))


# (q_len, kv_len, heads, kv_heads, block_q, block_k, causal): square, GQA, causal T < S and T > S, ragged.
CASES = [
    (64, 64, 4, 4, 16, 16, True),
    (40, 70, 4, 2, 16, 16, True),
    (70, 40, 6, 3, 32, 16, True),
    (45, 37, 4, 1, 16, 32, False),
]
# Per-head τ and θ spanning the interesting range (θ = -1 turns the similarity filter off).
TAU = np.array([0.3, 0.6, 0.85, 0.97, 0.5, 1.0], np.float32)
THETA = np.array([-1.0, 0.3, 0.5, 0.7, 0.9, 0.4], np.float32)


def _case_inputs(case, seed=0):
  q_len, kv_len, heads, kv_heads, block_q, block_k, _ = case
  return _inputs(seed, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads, block_q=block_q,
                 block_k=block_k)


def _density(mask, case):
  q_len, kv_len, _, _, block_q, block_k, causal = case
  return mask.sum() / (mask.shape[0] * mask.shape[1]
                       * causal_block_mask(q_len, kv_len, causal=causal, block_q=block_q,
                                           block_k=block_k).sum())


@pytest.mark.parametrize("case", CASES)
def test_matches_brute_force_rules(case):
  q, k = _case_inputs(case)
  heads, block_q, block_k, causal = case[2], case[4], case[5], case[6]
  tau, theta = TAU[:heads], THETA[:heads]
  mask = _predict(q, k, tau, theta, causal=causal, block_q=block_q, block_k=block_k)
  expected = _predict_numpy(q, k, tau, theta, causal=causal, block_q=block_q, block_k=block_k)
  np.testing.assert_array_equal(mask, expected)
  assert 0.0 < _density(mask, case) < 1.0


@pytest.mark.parametrize("case", CASES[1:3])
def test_matches_brute_force_with_sink(case):
  q, k = _case_inputs(case, seed=1)
  heads, block_q, block_k, causal = case[2], case[4], case[5], case[6]
  mask = _predict(q, k, 0.2, 0.95, causal=causal, block_q=block_q, block_k=block_k, attention_sink=True)
  expected = _predict_numpy(q, k, 0.2, 0.95, causal=causal, block_q=block_q, block_k=block_k,
                            attention_sink=True)
  np.testing.assert_array_equal(mask, expected)
  valid_rows = causal_block_mask(case[0], case[1], causal=causal, block_q=block_q, block_k=block_k).any(-1)
  np.testing.assert_array_equal(mask[..., 0], np.broadcast_to(valid_rows, mask.shape[:3]))


@pytest.mark.parametrize("knob", ["tau", "theta"])
def test_density_grows_with_each_knob(knob):
  case = CASES[1]
  q, k = _case_inputs(case, seed=2)
  block_q, block_k, causal = case[4], case[5], case[6]
  grid = np.linspace(0.0, 1.0, 11)
  densities = []
  for value in grid:
    tau, theta = (value, 0.5) if knob == "tau" else (0.7, value)
    densities.append(_density(_predict(q, k, tau, theta, causal=causal, block_q=block_q,
                                       block_k=block_k), case))
  assert np.all(np.diff(densities) >= 0)
  assert densities[-1] > densities[0]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tau, theta", [(1.0, -1.0), (0.0, 1.0), (1.0, 1.0)])
def test_dense_end_keeps_every_causal_valid_block(case, tau, theta):
  """τ = 1 keeps every allowed block; θ >= 1 forces every block; either way the mask is causal-dense."""
  q, k = _case_inputs(case, seed=3)
  q_len, kv_len, _, _, block_q, block_k, causal = case
  mask = _predict(q, k, tau, theta, causal=causal, block_q=block_q, block_k=block_k)
  valid = causal_block_mask(q_len, kv_len, causal=causal, block_q=block_q, block_k=block_k)
  np.testing.assert_array_equal(mask, np.broadcast_to(valid, mask.shape))


@pytest.mark.parametrize("case", CASES)
def test_every_row_keeps_at_least_one_block(case):
  q, k = _case_inputs(case, seed=4)
  q_len, kv_len, _, _, block_q, block_k, causal = case
  mask = _predict(q, k, 0.0, -1.0, causal=causal, block_q=block_q, block_k=block_k)
  valid_rows = causal_block_mask(q_len, kv_len, causal=causal, block_q=block_q, block_k=block_k).any(-1)
  kept_per_row = mask.sum(axis=-1)
  # τ = 0 with the filter off keeps exactly the top-1 block; rows with no causal-valid block keep none.
  np.testing.assert_array_equal(kept_per_row, np.broadcast_to(valid_rows.astype(int), kept_per_row.shape))


def test_causal_block_mask_is_bottom_right_aligned():
  # T = 3 blocks of 16, S = 2 blocks of 16, causal: queries 0..15 see no key (t + S - T < 0).
  np.testing.assert_array_equal(causal_block_mask(48, 32, causal=True, block_q=16, block_k=16),
                                [[False, False], [True, False], [True, True]])
  # T < S: the first query already sees the first S - T + 1 keys.
  np.testing.assert_array_equal(causal_block_mask(16, 40, causal=True, block_q=8, block_k=16),
                                [[True, True, False], [True, True, True]])
  for shape in [(37, 45, 16, 32), (45, 37, 32, 16)]:
    q_len, kv_len, block_q, block_k = shape
    np.testing.assert_array_equal(
        causal_block_mask(q_len, kv_len, causal=True, block_q=block_q, block_k=block_k),
        _oracles.causal_valid_blocks(q_len, kv_len, True, block_q, block_k))


@pytest.mark.parametrize("seq, heads, head_dim, block, centred, dtype", [
    (70, 3, 8, 16, True, jnp.float32),      # ragged last block
    (64, 2, 12, 32, False, jnp.bfloat16),   # head_dim not a power of two
])
def test_fused_block_statistics_match_jnp(seq, heads, head_dim, block, centred, dtype):
  """The one-pass Pallas block sums (used on GPU) give the jnp path's pooled means and similarities."""
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, seq, heads, head_dim)) + rng.standard_normal((1, 1, heads, head_dim))
  x = jnp.asarray(x, dtype)
  centre = jnp.mean(x, axis=1, keepdims=True, dtype=jnp.float32) if centred else None
  expected = _block_statistics(x, block, centre)
  fused = _block_statistics(x, block, centre, fused=True, interpret=True)
  for got, want in zip(fused, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_blocks", [2, 8, 32])
def test_folded_top_cdf_matches_full_sort(n_blocks):
  """Causal square masks sort rows i and n-1-i together; the kept causal blocks must not change."""
  rng = np.random.default_rng(n_blocks)
  lower = np.tril(np.ones((n_blocks, n_blocks), dtype=bool))
  allowed = lower & (rng.random((2, 3, 1, n_blocks)) < 0.8)       # some key blocks left out entirely
  scores = np.where(allowed, 3.0 * rng.standard_normal(allowed.shape), -np.inf)
  row_max = np.where(allowed.any(-1, keepdims=True), scores.max(-1, keepdims=True), 0.0)
  weights = np.where(allowed, np.exp(scores - row_max), 0.0)
  total = weights.sum(-1, keepdims=True)
  probs = jnp.asarray(np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0), jnp.float32)
  tau = jnp.asarray([0.0, 0.5, 0.95], jnp.float32)
  full = np.asarray(_top_cdf(probs, tau)) & lower
  folded = np.asarray(_top_cdf_causal_square(probs, tau)) & lower
  np.testing.assert_array_equal(folded, full)
  assert 0 < full.sum() < lower.sum() * 6
