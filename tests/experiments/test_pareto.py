"""experiments.pareto in quick mode: every point present and measured, and no extrapolation of AFBS-BO."""

from __future__ import annotations

import json
import os

import numpy as np

from afbs_jax import baselines
from experiments import common, pareto


# One baseline of each kind (block pattern, token-level, both oracles, SpargeAttn): the main table's quick
# test builds every baseline; here each extra one would only add a compilation.
NAMES = ("window", "h2o", "topk_token", "topk_block", "sparge_global")


def test_quick_run_writes_every_point_resuming_a_partial_run(tmp_path, work_dir, monkeypatch):
  monkeypatch.setattr(baselines, "NAMES", NAMES)
  options = dict(results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  partial = pareto.run(common.QUICK, names=baselines.NAMES[:1], **options)
  assert not partial["complete"] and not os.path.exists(tmp_path / "pareto_quick.png")
  payload = pareto.run(common.QUICK, names=NAMES, **options)  # measures only the points still missing
  assert payload["complete"]
  assert payload["points"][:len(partial["points"])] == json.loads(json.dumps(partial["points"]))
  written = json.loads((tmp_path / "pareto_quick.json").read_text())
  assert written["experiment"] == "pareto" and written["setting"]["name"] == "quick"
  for suffix in (".md", ".png"):
    assert os.path.getsize(tmp_path / f"pareto_quick{suffix}") > 0
  assert set(pareto.ORACLES) <= set(baselines.NAMES)
  points = written["points"]
  expected = {(name, target) for name in baselines.NAMES for target in common.QUICK.sparsities}
  assert {(p["method"], p["target"]) for p in points if p["method"] != "afbs"} == expected
  assert [p["band"] for p in points if p["method"] == "afbs"] == [list(b) for b in common.QUICK.bands]
  for p in points:
    assert 0.0 <= p["sparsity"] <= 1.0 and np.isfinite(p["ppl"]) and p["ppl"] > 1.0, p
    assert np.isclose(p["delta_ppl_percent"], 100.0 * (p["ppl"] / written["dense_ppl"] - 1.0))
  low, high = written["afbs_range"]
  assert low <= high
  for row in written["comparison"]:
    assert row["best_baseline"] not in pareto.ORACLES
    rivals = [p["delta_ppl_percent"] for p in points
              if p["target"] == row["target"] and p["method"] not in pareto.ORACLES]
    assert row["best_delta_ppl_percent"] == min(rivals)
    covered = low <= row["best_sparsity"] <= high
    assert (row["afbs_delta_ppl_percent"] is not None) == covered
  markdown = (tmp_path / "pareto_quick.md").read_text()
  assert "not covered" in markdown or all(r["afbs_delta_ppl_percent"] is not None for r in written["comparison"])
  assert pareto.discuss(payload) in markdown


def test_interpolation_stays_inside_afbs_points():
  points = [{"method": "afbs", "sparsity": s, "delta_ppl_percent": d} for s, d in ((0.6, 2.0), (0.4, 1.0))]
  assert pareto.interpolate_afbs(points, 0.5) == 1.5
  assert pareto.interpolate_afbs(points, 0.4) == 1.0
  assert pareto.interpolate_afbs(points, 0.39) is None and pareto.interpolate_afbs(points, 0.61) is None
  assert pareto.interpolate_afbs([], 0.5) is None
