"""experiments.frontier: decode budgets, the frontier's bookkeeping, where AFBS-BO's decode thresholds are
tuned and loaded, and a quick run's schema and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from afbs_jax import baselines, checkpoint, pipeline
from afbs_jax.attention import DecodeSparseAttention
from afbs_jax.tuner import model_tuning
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


def test_afbs_decode_thresholds_live_in_the_bands_prefill_checkpoint(tmp_path, monkeypatch):
  # What afbs_decode_policy adds to pipeline.tune_decode (tests/tuner/test_decode_tuning.py tunes for real,
  # as the quick CLI run does): where the thresholds go, the band they are tuned in, and reuse. A stand-in
  # tuning writes a finished [2 layers, 4 heads] decode checkpoint, so no tuning runs here.
  bench = common.Workbench(common.QUICK, work_dir=str(tmp_path), backend="reference")
  band = common.QUICK.bands[1]
  calls = []

  def tune_decode(model, tokenizer, train_text, config, *, checkpoint_dir):
    calls.append(((config.tune.eps_low, config.tune.eps_high), checkpoint_dir))
    tuned = checkpoint.empty_tuned(2, 4, {"tau": 0.9}, {
        "method": "decode",
        "method_options": {"decode_steps": 16, "attention_sink": True, "tau_rule": "top_p_candidates"},
        "blocks": {"block_q": 16, "block_k": 16}})
    tuned.metadata["layers_done"] = 2
    checkpoint.save_tuned(checkpoint_dir, tuned)
    return model_tuning.TunedModelResult(tuned=tuned, layer_stats=[], layers_resumed=0, wall_time_s=0.0)

  monkeypatch.setattr(pipeline, "tune_decode", tune_decode)
  policy = frontier.afbs_decode_policy(bench, band)
  prefill_dir = bench.checkpoint_dir("afbs", band)
  assert calls == [(band, checkpoint.decode_checkpoint_dir(prefill_dir))]
  assert isinstance(policy, DecodeSparseAttention) and policy.block_size == 16 and policy.backend == "reference"
  np.testing.assert_allclose(np.asarray(policy.tau), np.full((2, 4), 0.9))
  monkeypatch.setattr(pipeline, "tune_decode", lambda *args, **kwargs: pytest.fail("retuned a finished checkpoint"))
  again = frontier.afbs_decode_policy(bench, band)
  np.testing.assert_array_equal(np.asarray(again.tau), np.asarray(policy.tau))


def test_quick_run_writes_every_cell_and_resumes(tmp_path, work_dir, monkeypatch):
  # AFBS-BO's tuning is exercised by the other experiments' quick runs (decode: tests/tuner/
  # test_decode_tuning.py); here stand-in policies of the kinds the sweep builds (so their compiled
  # generate loops are reused, and only AFBS-BO's decode-sparsity measurement compiles more) keep this
  # test within ~70 s on 2 cores.
  stand_in = baselines.get("vertical_slash", sparsity=0.9, block_size=16, backend="reference")
  decode_stand_in = DecodeSparseAttention(top_k=2, block_size=16, backend="reference")
  monkeypatch.setattr(common.Workbench, "tune", lambda self, band: band)
  monkeypatch.setattr(common.Workbench, "tuned_policy", lambda self, tuned: stand_in)
  monkeypatch.setattr(frontier, "afbs_decode_policy", lambda bench, band: decode_stand_in)
  band = list(common.QUICK.bands[0])
  options = dict(results_dir=str(tmp_path), work_dir=work_dir, backend="reference", num_samples=2,
                 levels=(0.9,), methods=("vertical_slash",), bands=[common.QUICK.bands[0]])
  partial = frontier.run(common.QUICK, phases=("decode",), **options)
  assert [(c["phase"], c["method"]) for c in partial["cells"]] == [("dense", "dense"), ("decode", "decode_topk"),
                                                                   ("decode", "afbs")]
  payload = frontier.run(common.QUICK, **options)
  written = json.loads((tmp_path / "frontier_quick.json").read_text())
  assert written["experiment"] == "frontier" and written["setting"]["name"] == "quick"
  assert (tmp_path / "frontier_quick.png").stat().st_size > 0
  assert frontier.discuss(payload) in (tmp_path / "frontier_quick.md").read_text()
  cells = written["cells"]
  keys = [(c["phase"], c["method"], c["knob"]) for c in cells]
  assert keys == [("dense", "dense", None), ("decode", "decode_topk", 0.9), ("decode", "afbs", band),
                  ("prefill", "vertical_slash", 0.9), ("prefill", "afbs", band), ("both", "vertical_slash", 0.9),
                  ("both", "afbs", band)]
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
    else:
      assert cell["prefill_sparsity"] is None
    if cell["phase"] in ("decode", "both") and cell["method"] == "afbs":   # measured on the first prompt
      assert np.isfinite(cell["decode_sparsity"]) and 0.0 <= cell["decode_sparsity"] <= 1.0
    elif cell["phase"] in ("decode", "both"):
      assert cell["decode_sparsity"] == frontier.decode_budget(0.9, cell["prompt_tokens"], 16)[1]
    else:
      assert cell["decode_sparsity"] is None
    if cell["method"] == "afbs":
      sparsities = {"prefill": [cell["prefill_sparsity"]], "decode": [cell["decode_sparsity"]],
                    "both": [cell["prefill_sparsity"], cell["decode_sparsity"]]}[cell["phase"]]
      assert cell["level"] == np.mean(sparsities)
    elif cell["method"] != "dense":
      assert cell["level"] == cell["knob"]
  rows = {(row["phase"], row["method"]): row for row in written["frontier"]}
  assert set(rows) == {("prefill", "vertical_slash"), ("prefill", "afbs"), ("decode", "decode_topk"),
                       ("decode", "afbs"), ("both", "vertical_slash"), ("both", "afbs")}
  for (phase, method), row in rows.items():
    edge = frontier.frontier(cells, "niah_single", phase, method)
    assert row["pooled"] == edge["level"] and row["per_length"] == {"512": edge["level"]}
    assert row["pooled"] in (None, edge["levels"][0]["level"])
  assert not written["complete"]
  again = frontier.run(common.QUICK, **options)                   # nothing missing: nothing rescored
  assert again["cells"] == payload["cells"]
  # Slices measured into separate directories merge into what the one run wrote, naming both commits.
  levels, bands = written["levels"], [tuple(b) for b in written["bands"]]
  payload_of = frontier._payload   # pylint: disable=protected-access
  for name, part, commit in (("a", cells[:4], "aaa1111"), ("b", cells[2:], "bbb2222")):
    env = written["environment"] | {"commit": commit}
    common.write_results("frontier", payload_of(part, common.QUICK, levels, bands), "",
                         results_dir=str(tmp_path / name), setting=common.QUICK, env=env)
  merged = frontier.merge(common.QUICK, [str(tmp_path / "a"), str(tmp_path / "b")],
                          results_dir=str(tmp_path / "merged"))
  assert merged["cells"] == cells and merged["frontier"] == written["frontier"]
  merged_json = json.loads((tmp_path / "merged" / "frontier_quick.json").read_text())
  assert merged_json["environment"]["commit"] == "aaa1111, bbb2222"
  other = written["environment"] | {"commit": "ccc3333"}
  common.write_results("frontier", payload_of(cells, common.QUICK, (0.5,), bands), "",
                       results_dir=str(tmp_path / "c"), setting=common.QUICK, env=other)
  with pytest.raises(ValueError, match="levels"):
    frontier.merge(common.QUICK, [str(tmp_path / "a"), str(tmp_path / "c")], results_dir=str(tmp_path / "m2"))
  # An extra decode-only band: one more cell, in the decode phase alone, beside the grid.
  extra = frontier.run(common.QUICK, phases=("decode", "both"), decode_bands=[(0.3, 0.4), tuple(band)], **options)
  assert extra["cells"][:-1] == cells
  assert (extra["cells"][-1]["phase"], extra["cells"][-1]["method"], extra["cells"][-1]["knob"]) == (
      "decode", "afbs", [0.3, 0.4])
  assert len(frontier.frontier(extra["cells"], "niah_single", "decode", "afbs")["levels"]) == 2
  assert len(frontier.frontier(extra["cells"], "niah_single", "both", "afbs")["levels"]) == 1
  assert extra["bands"] == written["bands"] and extra["complete"] == written["complete"]


def test_decode_bands_flag_values():
  assert frontier.parse_bands(["0.35:0.45", "0.7:0.9"]) == ((0.35, 0.45), (0.7, 0.9))
  assert frontier.parse_bands([]) == ()
  for bad, message in (("0.4", "is not low:high"), ("a:b", "is not low:high"), ("0.5:0.4", "0 < low < high"),
                       ("0:0.1", "0 < low < high")):
    with pytest.raises(frontier.app.UsageError, match=message):
      frontier.parse_bands([bad])


def test_pairs_dense_answers_none_of_are_not_measured(tmp_path, work_dir, monkeypatch):
  # The quick run's random-weight model answers nothing; with the full run's rule, only dense is scored.
  monkeypatch.setattr(frontier, "_skips_dense_fails", lambda setting: True)
  monkeypatch.setattr(common.Workbench, "tune", lambda self, band: pytest.fail("tuned for a skipped pair"))
  monkeypatch.setattr(frontier, "afbs_decode_policy", lambda bench, band: pytest.fail("tuned for a skipped pair"))
  payload = frontier.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference",
                         num_samples=2, levels=(0.9,), methods=("vertical_slash",), bands=[], phases=("prefill",))
  assert [(c["method"], c["accuracy"]) for c in payload["cells"]] == [("dense", 0.0)]
  assert payload["frontier"] == [] and "no method can be significantly worse" in frontier.render(payload)


def test_frontiers_leave_out_pairs_dense_answers_none_of():
  dense, none = [1] * 20, [0] * 20
  cells = [_cell(0.0, dense, method="dense", phase="dense"), _cell(0.5, [0] * 10 + [1] * 10),
           _cell(0.0, none, method="dense", phase="dense", length=2048), _cell(0.5, none, length=2048)]
  assert frontier.answered_by_dense(cells) == {("t", 1024)}
  rows = frontier._frontiers(cells)   # pylint: disable=protected-access
  assert rows == [{"task": "t", "phase": "prefill", "method": "m", "pooled": None, "per_length": {"1024": None}}]
  kept = frontier._frontiers(cells, skip_dense_fails=False)   # pylint: disable=protected-access
  assert kept[0]["per_length"] == {"1024": None, "2048": 0.5}


def test_phase_tolerance_takes_the_best_fixed_method_per_pair_and_counts_a_failed_lowest_level_as_zero():
  rows = [{"task": "t", "phase": "prefill", "method": "a", "pooled": None, "per_length": {"1024": 0.6, "2048": None}},
          {"task": "t", "phase": "prefill", "method": "b", "pooled": None, "per_length": {"1024": 0.5, "2048": 0.7}},
          {"task": "u", "phase": "prefill", "method": "a", "pooled": None, "per_length": {"1024": None}},
          {"task": "t", "phase": "decode", "method": "decode_topk", "pooled": None, "per_length": {"1024": None}},
          {"task": "t", "phase": "decode", "method": "afbs", "pooled": 0.6, "per_length": {"1024": 0.62}},
          {"task": "t", "phase": "both", "method": "afbs", "pooled": 0.9, "per_length": {"1024": 0.9}}]
  tolerance = frontier.phase_tolerance(rows)
  assert tolerance["the best fixed method"] == {"prefill": [0.6, 0.7, 0.0], "decode": [0.0]}
  assert tolerance["AFBS-BO"] == {"prefill": [], "decode": [0.62]}
  # AFBS-BO has no prefill frontier here, so only the fixed methods' phases are compared.
  payload = {"frontier": rows, "cells": [], "model": "smollm2"}
  text = frontier.discuss(payload)
  assert "0.60 in prefill and 0.00 in decode for the best fixed method (3 and 1 pairs)" in text
  assert "here not so for the best fixed method." in text and "AFBS-BO" not in text
