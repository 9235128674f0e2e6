"""experiments.stage_ablation in quick mode: call accounting, validation guarantees and the convergence trace."""

from __future__ import annotations

import json
import os

import numpy as np

from experiments import common, stage_ablation


def test_quick_run_accounts_for_every_call(tmp_path, work_dir):
  payload = stage_ablation.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  written = json.loads((tmp_path / "stage_ablation_quick.json").read_text())
  assert written["experiment"] == "stage_ablation"
  for suffix in (".md", ".png"):
    assert os.path.getsize(tmp_path / f"stage_ablation_quick{suffix}") > 0
  methods = written["methods"]
  assert list(methods) == list(stage_ablation.METHODS)
  eps_high = written["band"][1]
  for name, method in methods.items():
    rows = method["layers"]
    assert [row["layer"] for row in rows] == [0, 1], name  # the tiny model's two layers
    for row in rows:
      assert row["calls"] == row["calls_low"] + row["calls_high"] == sum(row["calls_stage"]), name
      # One evaluator launch per ledger call: the counters were reset before each search.
      assert row["launches"] == {"low": row["calls_low"], "high": row["calls_high"]}, name
      assert all(0.0 <= value <= 1.0 for value in row["sparsity"]) and row["search_time_s"] > 0.0
      assert row["within_eps_high"] == np.mean(np.asarray(row["error"]) <= eps_high)
    summary = method["summary"]
    assert summary["calls"] == sum(row["calls"] for row in rows)
    assert summary["worst_error"] == max(row["worst_error"] for row in rows)
  for row in methods["random"]["layers"]:
    assert row["calls_low"] == 0 and row["calls_stage"][0] == stage_ablation.RANDOM_EVALS
  for row in methods["stage1"]["layers"]:
    assert row["calls_stage"][1] == 0 and row["calls_low"] == row["calls_stage"][0]
  for row in methods["stage12"]["layers"]:
    assert row["fallbacks"] == 0 and row["calls_stage"][2] == common.QUICK.num_validation
  # Cold start at layer 0: stages 1+2 make exactly the search calls of the full pipeline.
  assert methods["stage12"]["layers"][0]["calls_stage"][:2] == methods["afbs"]["layers"][0]["calls_stage"][:2]
  # Stage 3 falls back until validation passes (at worst to s = 0, dense-equivalent).
  for name in ("random", "stage1", "afbs"):
    assert methods[name]["summary"]["within_eps_high"] == 1.0 and methods[name]["summary"]["worst_error"] <= eps_high
  for name, conv in written["convergence"].items():
    for curve, row, stage1 in zip(conv["per_layer"], methods[name]["layers"], conv["stage1_calls"]):
      assert len(curve) == row["calls"] and np.all(np.diff(curve) >= 0) and 0.0 <= min(curve) <= max(curve) <= 1.0
      if name == "afbs":  # stage 1 is low fidelity only: nothing is verified feasible before stage 2
        assert not np.any(curve[:stage1]), curve
    assert len(conv["mean"]) == max(row["calls"] for row in methods[name]["layers"])
  assert stage_ablation.discuss(payload) in (tmp_path / "stage_ablation_quick.md").read_text()


def test_running_best_ignores_low_fidelity_and_infeasible_points():
  history = {"history_s": np.array([[0.9, 0.9], [0.5, 0.6], [0.7, 0.2], [0.8, 0.3]], np.float32),
             "history_error": np.array([[0.01, 0.01], [0.02, 0.09], [0.05, 0.01], [0.2, 0.01]], np.float32),
             "history_sparsity": np.array([[0.9, 0.9], [0.3, 0.5], [0.4, 0.1], [0.6, 0.2]], np.float32),
             "call_fidelity": ("low", "high", "high", "high"), "call_input_index": (0, 0, 0, 0)}
  sparsity, s = stage_ablation.running_best(history, eps_high=0.055, fidelity="high")
  np.testing.assert_allclose(sparsity, [[0.0, 0.0], [0.3, 0.0], [0.4, 0.1], [0.4, 0.2]])
  np.testing.assert_allclose(s, [[0.0, 0.0], [0.5, 0.0], [0.7, 0.2], [0.7, 0.3]])
  low_sparsity, _ = stage_ablation.running_best(history, eps_high=0.055, fidelity="low")
  np.testing.assert_allclose(low_sparsity[-1], [0.9, 0.9])
