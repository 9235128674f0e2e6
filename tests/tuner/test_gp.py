"""Tests of the stage-1 GP, its acquisitions and the promising-region extraction."""
from __future__ import annotations

import math

import numpy as np
import pytest

from afbs_jax.tuner import gp

GP_ARGS = dict(length_scale=0.2, noise=1e-4, amplitude_floor=1e-3)


def _matern52(a, b, scale):
  r = np.abs(a[:, None] - b[None, :]) / scale
  return (1 + np.sqrt(5) * r + 5 * r**2 / 3) * np.exp(-np.sqrt(5) * r)


def _numpy_posterior(x, y, grid, length_scale, noise, amplitude_floor):
  """Independent float64 reference of the standardised GP in `gp.posterior_on_grid`."""
  mean0, amplitude = y.mean(), max(y.std(), amplitude_floor)
  y_std = (y - mean0) / amplitude
  k_xx = _matern52(x, x, length_scale) + noise * np.eye(len(x))
  k_gx = _matern52(grid, x, length_scale)
  mean = mean0 + amplitude * k_gx @ np.linalg.solve(k_xx, y_std)
  var = 1.0 - np.einsum("gi,gi->g", k_gx, np.linalg.solve(k_xx, k_gx.T).T)
  return mean, amplitude * np.sqrt(np.maximum(var, 0))


def _buffers():
  """Three heads with 3, 5 and 2 observations in a capacity-6 buffer."""
  rng = np.random.default_rng(0)
  counts = [3, 5, 2]
  x = np.zeros((3, 6), np.float32)
  y = np.zeros((3, 6), np.float32)
  mask = np.zeros((3, 6), bool)
  for head, count in enumerate(counts):
    x[head, :count] = rng.uniform(0, 1, count)
    y[head, :count] = 0.1 * x[head, :count] ** (head + 1) + rng.normal(0, 0.002, count)
    mask[head, :count] = True
  return x, y, mask


def test_vmapped_step_matches_per_head_fit_and_reference():
  x, y, mask = _buffers()
  grid = gp.make_grid(257)
  _, mean, std = gp.acquisition_step(x, y, mask, grid, mode="band", eps_high=0.055, **GP_ARGS)
  for head in range(3):
    used = mask[head]
    single_mean, single_std = gp.posterior_on_grid(x[head, used], y[head, used], np.ones(used.sum(), bool),
                                                   grid, **GP_ARGS)
    np.testing.assert_allclose(mean[head], single_mean, atol=1e-5)
    np.testing.assert_allclose(std[head], single_std, atol=1e-5)
    ref_mean, ref_std = _numpy_posterior(x[head, used].astype(np.float64), y[head, used].astype(np.float64),
                                         np.asarray(grid, np.float64), **GP_ARGS)
    # f32 vs f64: the variance 1 − kᵀK⁻¹k cancels near observations, so std is compared more loosely.
    np.testing.assert_allclose(mean[head], ref_mean, atol=2e-4)
    np.testing.assert_allclose(std[head], ref_std, atol=1e-3)
    assert np.max(ref_std) > 5e-3  # the comparison is not vacuous


def test_posterior_interpolates_observations():
  x = np.array([0.2, 0.5, 0.8], np.float32)
  y = np.array([0.01, 0.03, 0.09], np.float32)
  mean, std = gp.posterior_on_grid(x, y, np.ones(3, bool), x, **GP_ARGS)
  np.testing.assert_allclose(mean, y, atol=1e-3)
  assert np.all(np.asarray(std) < 0.05 * np.std(y))  # noise jitter 1e-4 → ~0.01·amplitude, f32 slack


@pytest.mark.parametrize("y", [[0.02, 0.02, 0.02, 0.02], [0.01, 0.01, 0.05, 0.05]])
def test_ei_finite_with_duplicates_and_equal_errors(y):
  x = np.array([0.3, 0.3, 0.6, 0.6], np.float32)  # duplicate points
  y = np.asarray(y, np.float32)
  grid = gp.make_grid(257)
  mean, std = gp.posterior_on_grid(x, y, np.ones(4, bool), grid, **GP_ARGS)
  ei = np.asarray(gp.expected_improvement(mean, std, y.min()))
  assert np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(np.isfinite(ei))
  assert np.all(ei >= 0) and ei.max() > 0


def test_expected_improvement_matches_eq5():
  mean, std, best = np.array([0.02, 0.05]), np.array([0.01, 1e-12]), 0.03
  ei = np.asarray(gp.expected_improvement(mean, std, best))
  z = (best - 0.02) / 0.01
  cdf, pdf = 0.5 * (1 + math.erf(z / math.sqrt(2))), math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
  np.testing.assert_allclose(ei[0], (best - 0.02) * cdf + 0.01 * pdf, rtol=1e-5)
  np.testing.assert_allclose(ei[1], 0.0, atol=1e-9)  # no uncertainty, no improvement: 0, not NaN


def test_band_step_proposes_beyond_incumbent_or_stays_when_done():
  x = np.array([[0.2, 0.5, 0.8], [0.2, 0.5, 1.0]], np.float32)
  y = np.array([[0.004, 0.025, 0.2], [0.001, 0.002, 0.01]], np.float32)
  mask = np.ones_like(x, bool)
  next_s, _, _ = gp.acquisition_step(x, y, mask, gp.make_grid(257), mode="band", eps_high=0.055, **GP_ARGS)
  assert 0.5 < float(next_s[0]) < 0.8  # between the feasible 0.5 and the infeasible 0.8
  assert float(next_s[1]) == 1.0  # s = 1 is feasible: nothing to improve, re-propose the incumbent


def test_padding_slots_do_not_change_the_posterior():
  x, y, mask = _buffers()
  grid = gp.make_grid(257)
  _, mean, std = gp.acquisition_step(x, y, mask, grid, mode="paper", eps_high=0.055, **GP_ARGS)
  x_wide = np.concatenate([x, np.full((3, 10), 0.5, np.float32)], axis=1)  # junk in padded slots
  y_wide = np.concatenate([y, np.full((3, 10), 9.0, np.float32)], axis=1)
  mask_wide = np.concatenate([mask, np.zeros((3, 10), bool)], axis=1)
  _, mean_wide, std_wide = gp.acquisition_step(x_wide, y_wide, mask_wide, grid, mode="paper", eps_high=0.055,
                                               **GP_ARGS)
  np.testing.assert_allclose(mean, mean_wide, atol=1e-5)
  np.testing.assert_allclose(std, std_wide, atol=1e-5)


def _regions_case():
  grid = np.linspace(0, 1, 11, dtype=np.float32)
  # UCB = mean (std 0): feasible runs (<= 0.055) at indices 0-2, 5-6 and 9; index 5 has the lowest UCB.
  mean = np.array([[0.05, 0.04, 0.03, 0.1, 0.1, 0.0, 0.02, 0.1, 0.1, 0.05, 0.1]], np.float32)
  return grid, mean, np.zeros_like(mean)


@pytest.mark.parametrize("rank, expected", [
    ("sparsity", [[0.9, 0.9], [0.5, 0.6]]),
    ("ucb", [[0.5, 0.6], [0.0, 0.2]]),
])
def test_regions_are_ranked_maximal_runs(rank, expected):
  grid, mean, std = _regions_case()
  regions, valid = gp.extract_low_ucb_regions(grid, mean, std, eps_high=0.055, beta=2.0, num_regions=2,
                                              rank=rank)
  np.testing.assert_allclose(regions[0], expected, atol=1e-6)
  assert valid.tolist() == [[True, True]]


def test_regions_use_ucb_and_fall_back_to_s_zero():
  grid, mean, _ = _regions_case()
  std = np.full_like(mean, 0.1)  # UCB = mean + 0.2 > ε_high everywhere
  regions, valid = gp.extract_low_ucb_regions(grid, mean, std, eps_high=0.055, beta=2.0, num_regions=2,
                                              rank="sparsity")
  np.testing.assert_allclose(regions[0, 0], [0.0, 0.0])
  assert valid.tolist() == [[True, False]]


def test_boundary_brackets_end_at_first_confidently_infeasible_point():
  grid, mean, std = _regions_case()
  regions, valid = gp.extract_low_ucb_regions(grid, mean, std, eps_high=0.055, beta=2.0, num_regions=3,
                                              rank="sparsity")
  brackets = gp.boundary_brackets(grid, mean, std, regions, valid, eps_high=0.055, beta=2.0)
  np.testing.assert_allclose(brackets[0], [[0.9, 1.0], [0.6, 0.7], [0.2, 0.3]], atol=1e-6)


def test_bad_rank_raises():
  grid, mean, std = _regions_case()
  with pytest.raises(ValueError, match="rank"):
    gp.extract_low_ucb_regions(grid, mean, std, eps_high=0.055, beta=2.0, num_regions=1, rank="best")
