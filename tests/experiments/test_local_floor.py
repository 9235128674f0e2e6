"""experiments.local_floor in quick mode, and the afbs_local row it adds to the main table."""

from __future__ import annotations

import json

import numpy as np

from experiments import common, local_floor, main_table


def test_quick_run_tunes_each_floor_and_chooses_by_the_dominance_rule(tmp_path, work_dir):
  payload = local_floor.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  written = json.loads((tmp_path / "local_floor_quick.json").read_text())
  assert written["experiment"] == "local_floor" and written["complete"] and written["split"] == "validation"
  assert [row["local_blocks"] for row in payload["rows"]] == list(local_floor.FLOORS["quick"])
  for row in payload["rows"]:
    assert 0.0 <= row["sparsity"] < 1.0 and np.isfinite(row["ppl"]) and row["ppl"] > 1.0
    assert row["worst_validation_error"] <= common.PAPER_BAND[1] + 1e-6
  assert payload["chosen"] == local_floor.choose(payload["rows"])
  assert local_floor.chosen_floor(str(tmp_path), common.QUICK) == payload["chosen"]
  assert (tmp_path / "local_floor_quick.png").is_file()


def test_choose_takes_the_sparsest_floor_no_worse_than_none():
  rows = [{"local_blocks": 0, "sparsity": 0.60, "delta_ppl_percent": 2.0},
          {"local_blocks": 2, "sparsity": 0.66, "delta_ppl_percent": 1.9},
          {"local_blocks": 4, "sparsity": 0.70, "delta_ppl_percent": 2.1},   # sparser but worse: not eligible
          {"local_blocks": 8, "sparsity": 0.64, "delta_ppl_percent": 1.2}]
  assert local_floor.choose(rows) == 2
  assert local_floor.choose(rows[:1]) == 0 and local_floor.choose([]) == 0


def test_main_table_adds_afbs_with_the_chosen_floor(tmp_path, work_dir, monkeypatch):
  monkeypatch.setattr(local_floor, "chosen_floor", lambda results_dir, setting: 2)
  payload = main_table.run(common.QUICK, names=("window",), results_dir=str(tmp_path), work_dir=work_dir,
                           backend="reference")
  rows = {row["method"]: row for row in payload["rows"]}
  assert [row["method"] for row in payload["rows"]] == ["dense", "afbs", "afbs_local", "window"]
  assert rows["afbs_local"]["local_blocks"] == 2 and np.isfinite(rows["afbs_local"]["ppl"])
  # The floor keeps blocks SpargeAttn's mask may drop: the same band reaches a different operating point.
  assert rows["afbs_local"]["sparsity"] != rows["afbs"]["sparsity"] or rows["afbs_local"]["ppl"] != rows["afbs"]["ppl"]
  assert "floor of 2 recent key blocks" in main_table.discuss(payload)


def test_pareto_traces_afbs_with_the_chosen_floor_by_band(tmp_path, work_dir, monkeypatch):
  from experiments import pareto  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(local_floor, "chosen_floor", lambda results_dir, setting: 2)
  payload = pareto.run(common.QUICK, methods=("afbs", "afbs_local", "window"), results_dir=str(tmp_path),
                       work_dir=work_dir, backend="reference")
  local = [p for p in payload["points"] if p["method"] == "afbs_local"]
  assert [p["band"] for p in local] == [list(band) for band in common.QUICK.bands]
  assert all(p["local_blocks"] == 2 and np.isfinite(p["ppl"]) for p in local)
  assert payload["local_blocks"] == 2 and len(payload["comparison_local"]) == len(common.QUICK.sparsities)
  assert "afbs_local" not in payload["methods"]
  assert "2-block local floor" in pareto.render(payload)
