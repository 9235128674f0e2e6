"""Tests of the runtime drift monitor and the reduced re-tune."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from afbs_jax.tuner import AFBSConfig, tune_heads
from afbs_jax.tuner.drift import DriftMonitor, relative_l1_per_head, retune_heads
from afbs_jax.tuner.synthetic import PowerLawHeads

EPS_HIGH = 0.055


def test_triggers_after_exactly_the_window_and_not_before():
  monitor = DriftMonitor(EPS_HIGH, window=5)
  bad = np.array([0.01, 0.06])  # the worst head is over ε_high
  assert [monitor.observe(bad) for _ in range(4)] == [False] * 4
  assert monitor.observe(bad)
  assert monitor.num_triggers == 1 and monitor.consecutive == 0
  assert [monitor.observe(bad) for _ in range(5)] == [False] * 4 + [True]  # a full new window


def test_a_good_batch_resets_the_count():
  monitor = DriftMonitor(EPS_HIGH, window=3)
  errors = [0.06, 0.06, 0.05, 0.06, 0.06, 0.06]
  assert [monitor.observe([e]) for e in errors] == [False, False, False, False, False, True]


def test_nan_error_counts_as_drift():
  monitor = DriftMonitor(EPS_HIGH, window=2)
  assert not monitor.observe([0.01, np.nan])
  assert monitor.observe([np.nan, 0.01])


def test_observe_outputs_uses_relative_l1_per_head():
  dense = np.ones((2, 4, 3, 8), np.float32)
  sparse = dense.copy()
  sparse[:, :, 1] *= 1.1  # head 1 is 10 % off
  np.testing.assert_allclose(relative_l1_per_head(sparse, dense), [0.0, 0.1, 0.0], atol=1e-6)
  monitor = DriftMonitor(EPS_HIGH, window=1)
  assert monitor.observe_outputs(sparse, dense)
  with pytest.raises(ValueError, match="head_dim"):
    relative_l1_per_head(sparse[0], dense[0])


@pytest.mark.parametrize("kwargs, match", [(dict(window=0), "window"), (dict(eps_high=-1.0), "eps_high"),
                                           (dict(retune=3), "retune")])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DriftMonitor(**{"eps_high": EPS_HIGH, **kwargs})


def test_synthetic_shift_triggers_a_reduced_retune_that_restores_the_band():
  before = PowerLawHeads(scale=[0.1, 0.2, 0.12], power=[2.0, 3.0, 1.2])
  after = dataclasses.replace(before, scale=[0.2, 0.4, 0.24])  # the error curves double after the shift
  config = AFBSConfig()
  tuned = tune_heads(before, before.num_heads, config)
  state = {"result": tuned}

  def retune():
    state["result"] = retune_heads(after, after.num_heads, config, state["result"])
    return state["result"]

  shift_at, window = 30, 10
  monitor = DriftMonitor(EPS_HIGH, window=window, retune=retune)
  triggered_at = []
  for batch in range(60):
    heads = before if batch < shift_at else after
    error = heads.error(state["result"].s, "high", 1 + batch % 5)
    if monitor.observe(error):
      triggered_at.append(batch)
  assert triggered_at == [shift_at + window - 1]
  retuned = monitor.last_retune
  assert retuned is state["result"]
  assert retuned.num_calls_low <= 8 and retuned.num_calls_stage2 <= 2 * 2  # 8 BO calls, 2 bisections
  assert np.all(retuned.error <= EPS_HIGH) and np.all(retuned.s < tuned.s)
