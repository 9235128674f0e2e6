"""experiments.targets: met / missed / not measured, read off synthetic results."""

from __future__ import annotations

import json

from experiments import targets


def _row(method, sparsity, delta):
  return {"method": method, "sparsity": sparsity, "delta_ppl_percent": delta}


def _write(tmp_path, name, payload):
  (tmp_path / f"{name}.json").write_text(json.dumps(payload))


def test_nothing_measured_says_so(tmp_path):
  assert [row["status"] for row in targets.evaluate(str(tmp_path))] == ["not measured"] * 4


def test_statuses_follow_the_numbers(tmp_path):
  _write(tmp_path, "main_table", {
      "setting": {"block_size": 64}, "target_sparsity": 0.65, "complete": True,
      "rows": [_row("dense", 0.0, 0.0), _row("afbs", 0.65, 1.7), _row("afbs_local", 0.67, 0.5),
               _row("streamingllm", 0.65, 1.3), _row("topk_block", 0.65, 0.45)]})
  _write(tmp_path, "block_size", {"rows": [{"block_size": 16, **_row("afbs", 0.72, 0.9)}]})
  _write(tmp_path, "passkey", {"accuracy": {"dense": [1.0, 1.0], "afbs": [1.0, 0.9]}})
  sparsity, baselines, oracle, passkey = targets.evaluate(str(tmp_path))
  assert sparsity["status"] == "met" and "block 16" in sparsity["detail"] and "at block 64: closest" in sparsity["detail"]
  assert baselines["status"] == "met" and "streamingllm" in baselines["detail"]
  assert oracle["status"] == "met" and "1.11×" in oracle["detail"]        # 0.5 / 0.45 for the floored run
  assert passkey["status"] == "missed" and "10 points" in passkey["detail"]
  # The Pareto curve: a loss at a covered target makes a Table I win partial; uncovered targets do not count.
  def compare(minus):
    return [{"target": t, "best_baseline": "streamingllm", "afbs_minus_best": m}
            for t, m in zip((0.5, 0.7, 0.8), minus)]
  _write(tmp_path, "pareto", {"points": [], "comparison": compare([None, 0.2, 0.5]),
                              "comparison_local": compare([None, -0.6, 0.46])})
  _, baselines, _, _ = targets.evaluate(str(tmp_path))
  assert baselines["status"] == "partly met"
  assert "better at 1 of 2 covered targets (worse at 0.8 by 0.46 pp than streamingllm)" in baselines["detail"]
  assert "AFBS-BO is better" not in baselines["detail"]      # afbs lost at Table I: its curve is not cited
  _write(tmp_path, "pareto", {"points": [], "comparison_local": compare([None, -0.6, -0.1])})
  _, baselines, _, _ = targets.evaluate(str(tmp_path))
  assert baselines["status"] == "met" and "better at 2 of 2 covered targets" in baselines["detail"]
  (tmp_path / "pareto.json").unlink()
  _write(tmp_path, "main_table", {
      "setting": {"block_size": 64}, "target_sparsity": 0.65, "complete": False,
      "rows": [_row("dense", 0.0, 0.0), _row("afbs", 0.65, 1.7), _row("streamingllm", 0.65, 1.3)]})
  _, baselines, oracle, _ = targets.evaluate(str(tmp_path))
  assert baselines["status"] == "missed" and oracle["status"] == "not measured"
  assert "| target | status |" in targets.render(targets.evaluate(str(tmp_path)))
