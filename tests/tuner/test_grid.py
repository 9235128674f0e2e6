"""Tests of the grid-search tuners (SpargeAttn's autotune, the s-grid)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from afbs_jax.tuner import AFBSConfig
from afbs_jax.tuner import grid
from afbs_jax.tuner.synthetic import ParamSpaceHeads, PowerLawHeads

HEADS = ParamSpaceHeads(scale=[0.1, 0.2, 0.05, 0.3], power=[2.0, 3.0, 1.5, 4.0])


class ParamRecorder:
  def __init__(self, evaluate_params):
    self.evaluate_params = evaluate_params
    self.calls = []

  def __call__(self, params, fidelity, input_index):
    self.calls.append((*(np.asarray(params[name]) for name in ("tau", "theta", "lam")), fidelity, input_index))
    return self.evaluate_params(params, fidelity, input_index)


@pytest.fixture(scope="module")
def sparge_run():
  recorder = ParamRecorder(HEADS.evaluate_params)
  return recorder, grid.spargeattn_grid(recorder, HEADS.num_heads)


def test_spargeattn_grid_call_counts(sparge_run):
  recorder, result = sparge_run
  assert result.num_calls == len(recorder.calls) == result.num_calls_stage1 + result.num_calls_stage3
  assert result.num_calls_stage3 == 5
  thetas = [float(theta[0]) for _, theta, _, _, index in recorder.calls if index == 0]
  visited = sorted(set(thetas))
  assert visited == [k / 16 for k in range(-16, -16 + len(visited))]  # the grid prefix, in order
  for theta in visited:  # per θ: τ bisection (8–11 calls) + λ bisection (9–10 calls), heads in lock-step
    assert 17 <= thetas.count(theta) <= 21


def test_spargeattn_grid_finds_a_passing_config(sparge_run):
  _, result = sparge_run
  assert np.all(np.isnan(result.s))
  # SpargeAttn returns the bisections' final midpoints, not their last passing probes, so its error may
  # overshoot pv_l1 by what one bisection width allows; it must not overshoot by more.
  assert np.all(result.error < 0.055 * 1.01) and np.all(result.sparsity > 0.1)
  error, sparsity = HEADS.evaluate_params(result.params, "high", 0)
  assert np.all(error < 0.055 * 1.01) and np.all(sparsity > 0.1)
  assert np.sum(error < 0.055) >= 2
  assert np.all((result.lam <= 0) & (result.lam >= -50 * math.log(2)))


def test_bisection_follows_spargeattn_pass_direction():
  """A pass moves the interval down; the result is the final midpoint, within the 0.001 width."""
  threshold = np.array([0.3, 0.8, 0.05])  # error < l1 iff τ > threshold (lower τ is sparser)
  def evaluate_tau(tau):
    return np.where(np.asarray(tau) > threshold, 0.0, 1.0), np.zeros(3)
  ledger = grid.CallLedger(lambda p, f, i: evaluate_tau(p[:, 0]), 3, cache_repeats=False)
  tau, _ = grid._bisect(ledger, lambda t: np.stack([t, t, t], 1), np.ones(3, bool), 0.1, 1.0, 0.001, 0.5)
  np.testing.assert_allclose(tau, threshold, atol=0.001)
  assert 8 <= ledger.num_calls <= 11


def test_bucket_choice_takes_max_over_the_best_bucket():
  points = [[(0.9, -1.0, 10.0, 0.5), (0.95, -0.9375, 12.0, 0.5), (0.8, -0.875, 5.0, 0.6),
             (0.7, -0.8125, 30.0, 0.3)]]
  tau, theta, pvthreshd, mean_sparsity = grid._pick_bucket(points)
  np.testing.assert_allclose([tau[0], theta[0], pvthreshd[0], mean_sparsity[0]], [0.95, -0.9375, 12.0, 0.5])


def test_pvthreshd_to_lam():
  np.testing.assert_allclose(grid.pvthreshd_to_lam(np.array([0.0, 20.0])), [0.0, -20 * math.log(2)],
                             rtol=1e-6)


def test_s_grid_takes_the_largest_feasible_grid_point():
  heads = PowerLawHeads(scale=[0.1, 0.2, 0.03], power=[2.0, 3.0, 1.5])
  result = grid.s_grid(heads, heads.num_heads, AFBSConfig())
  truth = heads.boundary(0.055, input_indices=range(6))
  np.testing.assert_allclose(result.s, np.floor(truth / 0.05 + 1e-9) * 0.05, atol=1e-6)
  assert result.num_calls_stage1 == 21 and result.num_calls_stage3 == 5
  assert np.all(result.error <= 0.055)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="l1"):
    grid.SpargeGridConfig(l1=0.06, pv_l1=0.05)
  with pytest.raises(ValueError, match="spacing"):
    grid.s_grid(HEADS.latent_view(AFBSConfig().latent), HEADS.num_heads, spacing=0.0)
