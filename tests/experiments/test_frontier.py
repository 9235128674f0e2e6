"""experiments.frontier: decode budgets, the frontier's bookkeeping, and a quick run's schema and resume."""

from __future__ import annotations

import json

import numpy as np

from afbs_jax import baselines
from experiments import common, frontier


def test_decode_budget_reads_one_minus_the_level_of_the_blocks():
  # 8176-token prompt, block 64: the first decode step sees 8177 keys in 128 blocks.
  for level in (0.5, 0.8, 0.9):
    top_k, sparsity = frontier.decode_budget(level, 8176, 64)
    assert top_k + 2 == round((1 - level) * 128) and abs(sparsity - level) <= 0.5 / 128 + 1e-9
  top_k, sparsity = frontier.decode_budget(0.95, 496, 16)   # 32 blocks: sink + local + one chosen
  assert top_k == 1 and sparsity == 1 - 3 / 32


def _cell(level, correct, *, method="m", phase="prefill", length=1024, knob=None):
  return {"task": "t", "length": length, "num_samples": len(correct), "phase": phase, "method": method,
          "knob": level if knob is None else knob, "level": level, "correct": list(correct)}


def test_frontier_is_the_last_level_before_the_first_significant_loss():
  dense = [1] * 20
  cells = [_cell(0.0, dense, method="dense", phase="dense"),
           _cell(0.5, dense), _cell(0.7, [0] * 3 + [1] * 17),        # 3 discordant: p = 0.25, not worse
           _cell(0.8, [0] * 10 + [1] * 10),                          # p = 0.002: significantly worse
           _cell(0.9, dense)]                                        # a pass above a failure: ignored
  result = frontier.frontier(cells, "t", "prefill", "m")
  assert result["level"] == 0.7
  assert [row["not_worse"] for row in result["levels"]] == [True, True, False, True]
  assert frontier.frontier(cells, "t", "decode", "m") == {"level": None, "levels": []}
  # Pooled over lengths: 5 losses at each of two lengths (p = 0.0625 alone) are significant together.
  five = [0] * 5 + [1] * 15
  pooled = [_cell(0.0, dense, method="dense", phase="dense"), _cell(0.0, dense, method="dense", phase="dense",
                                                                      length=2048),
            _cell(0.5, five), _cell(0.5, five, length=2048)]
  assert frontier.frontier(pooled, "t", "prefill", "m", 1024)["level"] == 0.5
  assert frontier.frontier(pooled, "t", "prefill", "m")["level"] is None
  # A sparse method better than dense is never "worse".
  better = [_cell(0.0, [0] * 20, method="dense", phase="dense"), _cell(0.5, dense)]
  assert frontier.frontier(better, "t", "prefill", "m")["level"] == 0.5


def test_quick_run_writes_every_cell_and_resumes(tmp_path, work_dir, monkeypatch):
  # AFBS-BO's tuning is exercised by the other experiments' quick runs; here a stand-in prefill policy (the
  # same one the sweep builds, so its compiled generate is reused) keeps this test within ~30 s on 2 cores.
  stand_in = baselines.get("vertical_slash", sparsity=0.9, block_size=16, backend="reference")
  monkeypatch.setattr(common.Workbench, "tune", lambda self, band: band)
  monkeypatch.setattr(common.Workbench, "tuned_policy", lambda self, tuned: stand_in)
  options = dict(results_dir=str(tmp_path), work_dir=work_dir, backend="reference", num_samples=2,
                 levels=(0.9,), methods=("vertical_slash",), bands=[common.QUICK.bands[0]])
  partial = frontier.run(common.QUICK, phases=("decode",), **options)
  assert [(c["phase"], c["method"]) for c in partial["cells"]] == [("dense", "dense"), ("decode", "decode_topk")]
  payload = frontier.run(common.QUICK, **options)
  written = json.loads((tmp_path / "frontier_quick.json").read_text())
  assert written["experiment"] == "frontier" and written["setting"]["name"] == "quick"
  assert (tmp_path / "frontier_quick.png").stat().st_size > 0
  assert frontier.discuss(payload) in (tmp_path / "frontier_quick.md").read_text()
  cells = written["cells"]
  keys = [(c["phase"], c["method"], c["knob"]) for c in cells]
  assert keys == [("dense", "dense", None), ("decode", "decode_topk", 0.9), ("prefill", "vertical_slash", 0.9),
                  ("prefill", "afbs", list(common.QUICK.bands[0])), ("both", "vertical_slash", 0.9)]
  dense = cells[0]
  assert dense["p_value"] == 1.0 and dense["not_worse"] and dense["only_dense"] == dense["only_sparse"] == 0
  assert dense["level"] == 0.0 and dense["prefill_sparsity"] is None and dense["decode_sparsity"] is None
  for cell in cells:
    assert cell["task"] == "niah_single" and cell["length"] == 512 and cell["prompt_tokens"] <= 512 - 16
    assert len(cell["correct"]) == 2 and cell["accuracy"] == np.mean(cell["correct"])
    assert 0.0 <= cell["p_value"] <= 1.0 and cell["low"] <= cell["accuracy"] <= cell["high"]
    assert cell["not_worse"] == (not (cell["p_value"] < 0.05 and cell["only_dense"] > cell["only_sparse"]))
    if cell["phase"] in ("prefill", "both"):
      assert 0.5 < cell["prefill_sparsity"] < 1.0    # 0.9 saturates at 31 blocks' diagonal: 1 − 31/496
    if cell["phase"] in ("decode", "both"):
      assert cell["decode_sparsity"] == frontier.decode_budget(0.9, cell["prompt_tokens"], 16)[1]
    if cell["method"] == "afbs":
      assert cell["level"] == cell["prefill_sparsity"]
    elif cell["method"] != "dense":
      assert cell["level"] == cell["knob"]
  rows = {(row["phase"], row["method"]): row for row in written["frontier"]}
  assert set(rows) == {("prefill", "vertical_slash"), ("prefill", "afbs"), ("decode", "decode_topk"),
                       ("both", "vertical_slash")}
  for (phase, method), row in rows.items():
    edge = frontier.frontier(cells, "niah_single", phase, method)
    assert row["pooled"] == edge["level"] and row["per_length"] == {"512": edge["level"]}
    assert row["pooled"] in (None, edge["levels"][0]["level"])
  assert not written["complete"]
  again = frontier.run(common.QUICK, **options)                   # nothing missing: nothing rescored
  assert again["cells"] == payload["cells"]
