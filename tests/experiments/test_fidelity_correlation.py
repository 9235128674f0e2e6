"""experiments.fidelity_correlation in quick mode: ρ per head in [-1, 1], the summary consistent with it."""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import stats

from experiments import common, fidelity_correlation


def test_quick_run_reports_rho_per_head(tmp_path, work_dir):
  payload = fidelity_correlation.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir,
                                     backend="reference")
  written = json.loads((tmp_path / "fidelity_correlation_quick.json").read_text())
  assert written["experiment"] == "fidelity_correlation"
  for suffix in (".md", ".png"):
    assert os.path.getsize(tmp_path / f"fidelity_correlation_quick{suffix}") > 0
  grid = len(fidelity_correlation.S_GRID)
  rows = written["layers"]
  assert [row["layer"] for row in rows] == [0, 1]
  for row in rows:
    low, high = np.asarray(row["low_error"]), np.asarray(row["high_error"])
    assert low.shape == high.shape == (grid, len(row["rho"]))
    assert np.all(low >= 0.0) and np.all(high >= 0.0)
    assert np.isclose(row["mean_abs_gap"], np.mean(np.abs(low - high)), rtol=1e-5)
    for head, rho in enumerate(row["rho"]):
      assert rho is None or -1.0 <= rho <= 1.0
      assert (rho is None) == (np.ptp(low[:, head]) == 0 or np.ptp(high[:, head]) == 0)
  summary = written["summary"]
  defined = [rho for row in rows for rho in row["rho"] if rho is not None]
  assert summary["defined"] == len(defined) and summary["heads"] == len(defined) + len(summary["undefined"])
  assert summary["heads"] == sum(len(row["rho"]) for row in rows)
  if defined:
    assert np.isclose(summary["rho_mean"], np.mean(defined))
    assert np.isclose(summary["fraction_at_least_threshold"], np.mean(np.asarray(defined) >= 0.8))
  assert summary["mean_abs_gap"] >= 0.0
  assert fidelity_correlation.discuss(payload) in (tmp_path / "fidelity_correlation_quick.md").read_text()


def test_spearman_averages_ties_and_leaves_constant_curves_undefined():
  a = np.array([0.0, 0.0, 0.1, 0.2, 0.2])
  b = np.array([0.0, 0.1, 0.1, 0.3, 0.4])
  assert np.isclose(fidelity_correlation.spearman(a, b), stats.spearmanr(a, b).statistic)
  assert np.isclose(fidelity_correlation.spearman(a, -a), -1.0)
  assert fidelity_correlation.spearman(np.full(5, 0.05), b) is None
  assert fidelity_correlation.spearman(a, np.zeros(5)) is None
  rows = [{"layer": 0, "rho": [0.9, None, 0.7], "mean_abs_gap": 0.1, "mean_gap": 0.0}]
  summary = fidelity_correlation.summarize(rows)
  assert summary["defined"] == 2 and summary["undefined"] == [[0, 1]] and np.isclose(summary["rho_mean"], 0.8)
  assert summary["fraction_at_least_threshold"] == 0.5
