"""experiments.main_table in quick mode: the schema, matched sparsity and sane numbers."""

from __future__ import annotations

import json
import os

import numpy as np

from afbs_jax import baselines
from experiments import common, main_table


def test_quick_run_writes_a_complete_table_resuming_a_partial_one(tmp_path, work_dir):
  options = dict(results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  partial = main_table.run(common.QUICK, names=("window",), **options)
  assert not partial["complete"] and [row["method"] for row in partial["rows"]] == ["dense", "afbs", "window"]
  payload = main_table.run(common.QUICK, **options)  # measures only the rows still missing
  assert payload["complete"] and payload["rows"][:3] == json.loads(json.dumps(partial["rows"]))
  written = json.loads((tmp_path / "main_table_quick.json").read_text())
  assert written["experiment"] == "main_table" and written["setting"]["name"] == "quick"
  assert os.path.isfile(tmp_path / "main_table_quick.md")
  methods = [row["method"] for row in written["rows"]]
  assert methods == ["dense", "afbs", *baselines.NAMES]
  rows = {row["method"]: row for row in payload["rows"]}
  assert rows["dense"]["sparsity"] == 0.0 and rows["dense"]["delta_ppl"] == 0.0
  target = payload["target_sparsity"]
  assert 0.0 < target < 1.0
  for name in baselines.NAMES:  # every baseline at AFBS-BO's sparsity (sparge_global on the mean)
    tolerance = 0.03 if name == "sparge_global" else 0.02
    assert abs(rows[name]["sparsity"] - target) <= tolerance, name
  for row in payload["rows"]:
    assert np.isfinite(row["ppl"]) and row["ppl"] > 1.0, row["method"]
    assert 0.0 <= row["attention_flops_fraction"] <= 1.0
    assert row["kv_kept_mb"] <= row["kv_dense_mb"]
  # Distinct methods at the same sparsity give distinct perplexities (each policy really ran).
  assert len({round(rows[name]["ppl"], 6) for name in ("window", "random", "topk_token", "h2o")}) == 4
