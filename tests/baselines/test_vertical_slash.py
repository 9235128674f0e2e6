"""vertical_slash against a float64 brute force over tokens: line masses, the kept tiles, the exact target."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import afbs_jax.baselines as baselines
from afbs_jax.baselines import sparsity
from afbs_jax.baselines.vertical_slash import line_mass
from tests.baselines import _oracles

SHAPES = [(128, 128), (64, 128), (100, 100)]   # square, decode-like T < S, partial last block
BLOCK = 16


def _brute_lines(q, k, block):
  """(vertical, slash) float64 [batch, heads, n_k] by looping over the last block's queries and keys."""
  q_len, kv_len = q.shape[1], k.shape[1]
  probs = _oracles.softmax_probs(q, k, _oracles.causal(q_len, kv_len))
  rows, n_k = min(block, q_len), math.ceil(kv_len / block)
  vertical, slash = np.zeros((*probs.shape[:2], n_k)), np.zeros((*probs.shape[:2], n_k))
  for t in range(q_len - rows, q_len):
    own = t + kv_len - q_len
    for u in range(kv_len):
      if u <= own:
        vertical[..., u // block] += probs[:, :, t, u]
        slash[..., (own - u) // block] += probs[:, :, t, u]
  return vertical, slash


def _brute_mask(q, k, block, target):
  """One bool [rows, cols] per (batch, head): diagonal first, then by max(vertical, crossing slash)."""
  valid, distance, diagonal = _oracles.geometry(q.shape[1], k.shape[1], block)
  counts = _oracles.budgets(valid.sum(1), diagonal.sum(1), target)
  vertical, slash = _brute_lines(q, k, block)
  masks = []
  for v_head, s_head in zip(vertical.reshape(-1, vertical.shape[-1]), slash.reshape(-1, slash.shape[-1])):
    mask = np.zeros_like(valid)
    for i, count in enumerate(counts):
      score = lambda j: max(v_head[j], s_head[distance[i, j]], s_head[distance[i, j] - 1] if distance[i, j] else 0)
      cells = sorted(np.flatnonzero(valid[i]), key=lambda j: (not diagonal[i, j], -score(j), j))
      mask[i, cells[:count]] = True
    masks.append(mask)
  return np.stack(masks)


@pytest.mark.parametrize("q_len, kv_len", SHAPES)
def test_line_mass_matches_brute_force(q_len, kv_len):
  q, k, _ = _oracles.random_qkv(q_len=q_len, kv_len=kv_len)
  got = line_mass(q, k, block=BLOCK)
  for got_lines, expected in zip(got, _brute_lines(q, k, BLOCK)):
    np.testing.assert_allclose(np.asarray(got_lines), expected, atol=1e-5)
  rows = min(BLOCK, q_len)  # every query of the window sees a key, so each line family sums to its rows
  np.testing.assert_allclose(np.asarray(got[0]).sum(-1), rows, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]).sum(-1), rows, rtol=1e-5)


@pytest.mark.parametrize("q_len, kv_len", SHAPES)
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_block_mask_matches_brute_force_and_meets_the_target(q_len, kv_len, target):
  q, k, _ = _oracles.random_qkv(q_len=q_len, kv_len=kv_len, seed=3)
  policy = baselines.get("vertical_slash", sparsity=target, block_size=BLOCK)
  mask = np.asarray(policy.block_mask(q, k))
  np.testing.assert_array_equal(mask.reshape(-1, *mask.shape[2:]), _brute_mask(q, k, BLOCK, target))
  valid = _oracles.geometry(q_len, kv_len, BLOCK)[0]
  achieved = np.asarray(sparsity.block_sparsity(policy.token_mask(q, k), BLOCK))
  np.testing.assert_allclose(achieved, target, atol=0.5 / valid.sum() + 1e-6)


def test_planted_vertical_and_slash_lines_are_kept():
  # Key 40 (block 2) draws nearly all of every later query's attention: a vertical line. Every row past it
  # that keeps more than its diagonal keeps that column first.
  q, k, v = _oracles.random_qkv(q_len=128, heads=1, kv_heads=1, batch=1)
  q, k = q * 0.0 + 1.0, (k * 0.0).at[:, 40].set(8.0)
  mask = np.asarray(baselines.get("vertical_slash", sparsity=0.5, block_size=BLOCK).block_mask(q, k))[0, 0]
  extra = [row for row in range(3, 8) if mask[row].sum() > 1]
  assert extra and all(mask[row, 2] for row in extra), "the vertical line's column was dropped"
  # A slash: rotary-style q_t, k_u whose logit peaks at u = t − 20 (offset band 1), so each query of the
  # window looks at a different key and no column stands out.
  angles = 2 * np.pi * np.arange(1, 9) / 256
  rotary = lambda positions: 10.0 * np.concatenate([np.cos(np.outer(positions, angles)),
                                                    np.sin(np.outer(positions, angles))], -1)[None, :, None]
  q_line, k_line = (jax.numpy.asarray(rotary(np.arange(128) - shift), jax.numpy.float32) for shift in (20, 0))
  vertical, slash = (np.asarray(x)[0, 0] for x in line_mass(q_line, k_line, block=BLOCK))
  assert slash[1] == pytest.approx(16.0, rel=1e-4) and vertical.max() < 0.8 * slash[1]
  out = jax.jit(lambda q, k, v: baselines.get("vertical_slash", sparsity=0.5, block_size=BLOCK,
                                              backend="reference")(q, k, v, layer=0))(q, k, v)
  assert out.shape == q.shape and np.all(np.isfinite(np.asarray(out)))


def test_registered_for_get_but_outside_table_one():
  assert "vertical_slash" in baselines.POLICIES and "vertical_slash" not in baselines.NAMES
  assert baselines.get("vertical_slash", sparsity=0.5).granularity == "block"
