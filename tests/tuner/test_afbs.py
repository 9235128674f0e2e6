"""Tests of AFBS-BO (`tune_heads`) on synthetic heads with known error curves."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from afbs_jax.tuner import AFBSConfig, TuneResult, tune_heads
from afbs_jax.tuner.synthetic import PowerLawHeads

EPS_LOW, EPS_HIGH = 0.045, 0.055
TOLERANCE = 1 / 16
# Head 2 stays below ε_low even at s = 1 (0.03·1 = 0.03); the others cross ε_high inside (0, 1).
SMOOTH = PowerLawHeads(scale=[0.1, 0.2, 0.03, 0.3, 0.12, 0.5], power=[2.0, 3.0, 1.5, 4.0, 1.2, 2.5])
NOISY = PowerLawHeads(scale=[0.1, 0.2, 0.03, 0.3, 0.12, 0.5], power=[2.0, 3.0, 1.5, 4.0, 1.2, 2.5],
                      wiggle=0.01, wiggle_freq=4.0, noise=0.002)
# Low fidelity underestimates the error here (its curve is shifted the other way).
OPTIMISTIC = dataclasses.replace(NOISY, low_fidelity_shift=-0.03)
CASES = (("smooth", SMOOTH), ("noisy", NOISY), ("optimistic", OPTIMISTIC))


class Recorder:
  """Wraps an evaluator and records every call's arguments."""

  def __init__(self, evaluate):
    self.evaluate = evaluate
    self.calls = []

  def __call__(self, s, fidelity, input_index):
    self.calls.append((np.asarray(s).copy(), fidelity, input_index))
    return self.evaluate(s, fidelity, input_index)


@pytest.fixture(scope="module")
def band_results():
  return {name: tune_heads(heads, heads.num_heads, AFBSConfig()) for name, heads in CASES}


@pytest.mark.parametrize("name, heads", CASES)
def test_band_mode_finds_the_boundary_and_validates(band_results, name, heads):
  result = band_results[name]
  truth = heads.boundary(EPS_HIGH, input_indices=range(len(heads.factors)))
  assert np.all(result.s <= truth + 1e-6), (result.s, truth)  # never beyond the feasible boundary
  assert np.all(truth - result.s <= TOLERANCE), (result.s, truth)
  assert np.all(result.error <= EPS_HIGH)
  # The reported error is the worst over the validation inputs at the returned s.
  worst = np.max([heads.error(result.s, "high", i) for i in range(1, 6)], axis=0)
  np.testing.assert_allclose(result.error, worst, rtol=1e-6)


def test_head_below_band_at_full_sparsity_ends_at_s_one(band_results):
  assert band_results["smooth"].s[2] == pytest.approx(1.0, abs=1e-6)
  assert band_results["smooth"].error[2] < EPS_LOW


def test_result_accounting_is_consistent(band_results):
  result = band_results["smooth"]
  assert isinstance(result, TuneResult) and result.num_heads == SMOOTH.num_heads
  assert result.num_calls == result.num_calls_low + result.num_calls_high
  assert result.num_calls == result.num_calls_stage1 + result.num_calls_stage2 + result.num_calls_stage3
  assert result.history_s.shape == result.history_error.shape == (result.num_calls, SMOOTH.num_heads)
  assert len(result.call_fidelity) == len(result.call_stage) == result.num_calls
  assert result.call_fidelity.count("low") == result.num_calls_stage1 <= 15
  assert result.num_calls_stage2 <= 8 and result.num_calls_stage3 == 5
  assert all(index == 0 for index, stage in zip(result.call_input_index, result.call_stage) if stage < 3)
  assert sorted(set(result.call_input_index)) == [0, 1, 2, 3, 4, 5]


def test_calls_are_lock_step_and_never_repeat_exactly():
  recorder = Recorder(SMOOTH)
  result = tune_heads(recorder, SMOOTH.num_heads, AFBSConfig())
  assert len(recorder.calls) == result.num_calls
  assert all(s.shape == (SMOOTH.num_heads,) for s, _, _ in recorder.calls)
  keys = {(s.tobytes(), fidelity, index) for s, fidelity, index in recorder.calls}
  assert len(keys) == len(recorder.calls)
  for s, fidelity, index in recorder.calls:
    assert fidelity == "high" or index == 0  # validation inputs only at high fidelity


def test_paper_mode_runs_algorithm_1_as_written():
  config = AFBSConfig(acquisition="paper", cache_repeats=False)
  result = tune_heads(SMOOTH, SMOOTH.num_heads, config)
  assert result.num_calls_low == result.num_calls_stage1 == 15
  # 4 bisection steps per region; a second region is searched when any head has one.
  assert result.num_calls_stage2 in (4, 8)
  assert set(result.call_stage) == {1, 2, 3}
  assert result.num_calls_stage3 == (10 if result.num_fallbacks.any() else 5)
  assert np.all(result.num_fallbacks <= 1)  # a single fallback
  # Line 25: only probes inside the band are kept, otherwise s stays 0 (which EI on error drifts toward).
  calibration_error = SMOOTH.error(result.s, "high", 0)
  kept = result.s > 0
  assert np.all((calibration_error[kept] >= EPS_LOW) & (calibration_error[kept] <= EPS_HIGH))


def test_paper_mode_with_cache_never_exceeds_the_budget():
  result = tune_heads(SMOOTH, SMOOTH.num_heads, AFBSConfig(acquisition="paper"))
  assert result.num_calls_low <= 15 and result.num_calls_stage2 <= 8 and result.num_calls_stage3 in (5, 10)


def test_head_whose_low_fidelity_is_too_optimistic_retreats():
  # Low fidelity: 0.06·min(s + 0.2, 1) is feasible at s = 1; high fidelity crosses ε_high at s = 11/12.
  heads = PowerLawHeads(scale=[0.06, 0.1], power=[1.0, 2.0], low_fidelity_shift=-0.2, factors=(1.0,) * 6)
  result = tune_heads(heads, heads.num_heads, AFBSConfig())
  truth = heads.boundary(EPS_HIGH)
  assert np.all(result.s <= truth + 1e-6) and np.all(truth - result.s <= TOLERANCE)
  np.testing.assert_array_equal(result.num_fallbacks, 0)  # stage 2 found a feasible s by itself
  assert result.num_calls_stage2 == 8  # the second region's budget went to the retreat


def test_fallback_repeats_until_validation_passes():
  hard = dataclasses.replace(SMOOTH, factors=(1.0, 1.0, 1.4, 1.0, 1.0, 1.0))  # input 2 is harder
  result = tune_heads(hard, hard.num_heads, AFBSConfig())
  assert np.all(result.error <= EPS_HIGH)
  assert result.num_fallbacks[[0, 1, 3, 4, 5]].min() >= 1
  truth = hard.boundary(EPS_HIGH, input_indices=range(6))
  assert np.all(result.s <= truth + 1e-6)


def test_fallback_ends_dense_after_max_fallbacks():
  impossible = dataclasses.replace(SMOOTH, factors=(1.0, 1.0, 1e4, 1.0, 1.0, 1.0))
  config = AFBSConfig(max_fallbacks=2)
  result = tune_heads(impossible, impossible.num_heads, config)
  np.testing.assert_array_equal(result.s, 0.0)
  np.testing.assert_array_equal(result.error, 0.0)
  np.testing.assert_array_equal(result.num_fallbacks, 3)  # two ×0.9 fallbacks, then s = 0


def test_warm_start_uses_fewer_calls_and_stays_accurate(band_results):
  cold = band_results["smooth"]
  warm = tune_heads(SMOOTH, SMOOTH.num_heads, AFBSConfig(), warm_start=cold)
  assert warm.num_calls_low <= 8 < 15
  assert warm.num_calls_stage2 <= 2 * 3
  assert warm.num_calls < cold.num_calls
  truth = SMOOTH.boundary(EPS_HIGH, input_indices=range(6))
  assert np.all(np.abs(truth - warm.s) <= TOLERANCE) and np.all(warm.error <= EPS_HIGH)
  # The warm start's first low-fidelity points sit around the previous s.
  first = warm.history_s[0]
  np.testing.assert_allclose(first, np.clip(cold.s - 0.1, 0, 1), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps_low=0.06, eps_high=0.05), "eps_low"),
    (dict(acquisition="ei"), "acquisition"),
    (dict(grid_size=64), "grid_size"),
    (dict(fallback_factor=1.0), "fallback_factor"),
    (dict(bo_init=(0.2, 1.5)), "bo_init"),
    (dict(max_fallbacks=-1), "max_fallbacks"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AFBSConfig(**kwargs)


def test_bad_evaluator_output_raises():
  def wrong_shape(s, fidelity, input_index):
    return np.zeros(3), np.zeros(3)
  with pytest.raises(ValueError, match=r"shape \[6\]"):
    tune_heads(wrong_shape, 6, AFBSConfig(bo_iters=0))
  def nan_error(s, fidelity, input_index):
    return np.full(6, np.nan), np.zeros(6)
  with pytest.raises(ValueError, match="non-finite error"):
    tune_heads(nan_error, 6, AFBSConfig(bo_iters=0))


def test_bad_warm_start_raises():
  with pytest.raises(ValueError, match="warm_start"):
    tune_heads(SMOOTH, SMOOTH.num_heads, AFBSConfig(), warm_start=[0.5, 0.5])
