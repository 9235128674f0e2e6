"""experiments.pareto in quick mode: every point present and measured, no extrapolation of AFBS-BO, and
partial runs of disjoint methods merged into what one run writes."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from afbs_jax import baselines
from experiments import common, pareto


# One baseline of each kind (block pattern, token-level, both oracles, SpargeAttn): the main table's quick
# test builds every baseline; here each extra one would only add a compilation.
NAMES = ("window", "h2o", "topk_token", "topk_block", "sparge_global")


def test_quick_run_writes_every_point_resuming_a_partial_run(tmp_path, work_dir, monkeypatch):
  monkeypatch.setattr(baselines, "NAMES", NAMES)
  options = dict(results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  partial = pareto.run(common.QUICK, methods=(pareto.AFBS, baselines.NAMES[0]), **options)
  assert not partial["complete"] and not os.path.exists(tmp_path / "pareto_quick.png")
  payload = pareto.run(common.QUICK, **options)  # every method of the (patched) NAMES: only the missing points
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


def _points(setting: common.Setting) -> list[dict]:
  """Made-up points for every key of a complete run of `setting` (no local floor)."""
  rng = np.random.default_rng(0)
  points = []
  for method, key in pareto._keys(setting, None):   # pylint: disable=protected-access
    ppl = 30.0 * (1.0 + rng.random())
    traced = method in pareto.TRACED
    points.append({"method": method, "granularity": "block", "target": None if traced else key,
                   "band": list(key) if traced else None, "sparsity": float(rng.random()), "block_sparsity": None,
                   "token_sparsity": None, "ppl": ppl, "delta_ppl_percent": 100.0 * (ppl / 30.0 - 1.0)})
  return points


def _write_part(directory, points, setting=common.QUICK, dense_ppl=30.0):
  payload = pareto.assemble(setting, points, dense_ppl=dense_ppl, workload="tiny on sotu", floor=None)
  pareto._write(payload, str(directory), setting)   # pylint: disable=protected-access
  return str(directory)


def test_merge_of_partial_runs_writes_what_one_run_writes(tmp_path):
  points = _points(common.QUICK)
  half = len(points) // 2
  # Two shares with one point in both, measured differently: the first source's copy wins.
  part_a = _write_part(tmp_path / "a", points[:half + 1])
  part_b = _write_part(tmp_path / "b", [dict(points[half], ppl=99.0)] + points[half + 1:])
  merged = pareto.merge(common.QUICK, [part_a, part_b], results_dir=str(tmp_path / "merged"))
  assert merged["complete"] and merged["points"] == points
  env = json.loads((tmp_path / "a" / "pareto_quick.json").read_text())["environment"]
  single = pareto.assemble(common.QUICK, points, dense_ppl=30.0, workload="tiny on sotu", floor=None)
  pareto._write(single, str(tmp_path / "single"), common.QUICK, env=env)   # pylint: disable=protected-access
  for suffix in (".json", ".md"):
    assert ((tmp_path / "merged" / f"pareto_quick{suffix}").read_text()
            == (tmp_path / "single" / f"pareto_quick{suffix}").read_text())
  assert os.path.getsize(tmp_path / "merged" / "pareto_quick.png") > 0
  # A merge missing points is partial: no plot, and `run` in that directory resumes it.
  partial = pareto.merge(common.QUICK, [part_a], results_dir=str(tmp_path / "partial"))
  assert not partial["complete"] and not os.path.exists(tmp_path / "partial" / "pareto_quick.png")


def test_merge_names_every_source_commit(tmp_path):
  points = _points(common.QUICK)
  parts = []
  for name, commit, share in (("a", "aaa1111", points[:3]), ("b", "bbb2222, aaa1111", points[3:5]),
                              ("c", "ccc3333", points[5:])):
    payload = pareto.assemble(common.QUICK, share, dense_ppl=30.0, workload="tiny on sotu", floor=None)
    env = {"device": "cpu", "platform": "cpu", "jax": "0", "date": "2026-01-01", "commit": commit}
    pareto._write(payload, str(tmp_path / name), common.QUICK, env=env)   # pylint: disable=protected-access
    parts.append(str(tmp_path / name))
  pareto.merge(common.QUICK, parts, results_dir=str(tmp_path / "merged"))
  merged = json.loads((tmp_path / "merged" / "pareto_quick.json").read_text())
  assert merged["environment"]["commit"] == "aaa1111, bbb2222, ccc3333"
  assert "commit aaa1111, bbb2222, ccc3333" in (tmp_path / "merged" / "pareto_quick.md").read_text()


def test_merge_accepts_rounding_but_refuses_parts_of_different_runs(tmp_path):
  points = _points(common.QUICK)
  part_a = _write_part(tmp_path / "a", points[:3])
  rounded = _write_part(tmp_path / "rounding", points[3:], dense_ppl=30.0 * (1 + 1e-9))   # batching's rounding
  assert pareto.merge(common.QUICK, [part_a, rounded], results_dir=str(tmp_path / "merged_rounding"))["complete"]
  other_ppl = _write_part(tmp_path / "b", points[3:], dense_ppl=30.0 * (1 + 1e-5))
  with pytest.raises(ValueError, match="dense_ppl"):
    pareto.merge(common.QUICK, [part_a, other_ppl], results_dir=str(tmp_path / "merged"))
  other_grid = dataclasses.replace(common.QUICK, sparsities=(0.5, 0.6))
  _write_part(tmp_path / "c", _points(other_grid)[:3], setting=other_grid)
  with pytest.raises(ValueError, match="another setting.*sparsities"):
    pareto.merge(common.QUICK, [part_a, str(tmp_path / "c")], results_dir=str(tmp_path / "merged"))
  with pytest.raises(ValueError, match="does not exist"):
    pareto.merge(common.QUICK, [part_a, str(tmp_path / "nothing")], results_dir=str(tmp_path / "merged"))
  assert not os.path.exists(tmp_path / "merged")
  with pytest.raises(ValueError, match="unknown methods nope"):
    pareto.run(common.QUICK, methods=("nope",), results_dir=str(tmp_path), work_dir=str(tmp_path))
