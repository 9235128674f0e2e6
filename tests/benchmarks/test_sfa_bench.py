"""benchmarks.sfa_bench on CPU: the quick run end to end (interpret kernels), and the cuDNN fallback."""

from __future__ import annotations

import dataclasses
import json
import math

from benchmarks import sfa_bench


def test_quick_run_checks_times_and_reports_every_contender(tmp_path):
  out = tmp_path / "sfa.json"
  sfa_bench.run(sfa_bench.quick_settings(), out=str(out))
  results = json.loads(out.read_text())
  assert set(results) == {"environment", "settings", "rows", "where_it_pays"}
  assert {"device_kind", "platform", "jax", "date"} <= set(results["environment"])
  assert results["settings"]["dtype"] == "float32" and results["settings"]["seq_lens"] == [256]
  rows = results["rows"]
  assert [(row["variant"], row["backend"], row["k"]) for row in rows] == [
      ("cudnn_dense", "xla", None), ("pallas_dense", "interpret", None), ("sfa", "interpret", 8),
      ("sfa", "interpret_codes", 8)]
  for row in rows:
    assert "note" not in row, row
    assert row["seq_len"] == 256 and row["head_dim"] == 32
    assert math.isfinite(row["ms"]) and row["ms"] > 0
    # f32 inputs, f32 kernels in interpret mode against the f32 reference: rounding only.
    assert row["check_max_abs_error"] < 1e-4, row
  for row in rows[2:]:
    assert row["form"] == ("dense_tiles" if row["backend"] == "interpret" else "codes")
    assert row["qk_flops_fraction"] == (8 / 32) ** 2 and row["attention_flops_fraction"] == (1 + 1 / 16) / 2
    for ratio, baseline in (("vs_cudnn", rows[0]), ("vs_pallas", rows[1])):
      assert math.isfinite(row[ratio]) and row[ratio] > 0
      assert abs(row[ratio] - row["ms"] / baseline["ms"]) < 1e-12
  # Every SFA row is judged once per ratio, from the data.
  for ratio in ("vs_cudnn", "vs_pallas"):
    pays, does_not = results["where_it_pays"][f"{ratio}_pays"], results["where_it_pays"][f"{ratio}_does_not"]
    assert not results["where_it_pays"][f"{ratio}_not_measured"]
    assert sorted(pays + does_not) == sorted(f"T=256 d=32 k=8 {b}" for b in ("interpret", "interpret_codes"))
    assert all(rows[2 + ("codes" in label)][ratio] < 1 for label in pays)
  text = (tmp_path / "sfa.md").read_text()
  assert results["environment"]["device_kind"] in text and results["environment"]["jax"] in text
  assert "| 256 | 32 | 8 | interpret_codes |" in text and "forward vs cuDNN: pays at" in text


def test_cudnn_unavailable_falls_back_to_xla_and_skips_pallas_with_a_reason(tmp_path):
  settings = dataclasses.replace(sfa_bench.quick_settings(), dense_implementation="cudnn",
                                 pallas_backend=None, sfa_backends=("reference",), backward=True)
  results = sfa_bench.run(settings, out=str(tmp_path / "sfa.json"))
  cudnn, pallas, sfa = results["rows"]
  assert cudnn["backend"] == "xla" and "cudnn failed" in cudnn["note"] and cudnn["ms"] > 0
  assert cudnn["bwd_ms"] > 0 and cudnn["check_max_abs_error"] < 1e-4
  assert math.isnan(pallas["ms"]) and "skipped" in pallas["note"]
  assert sfa["bwd_ms"] > 0 and sfa["bwd_vs_cudnn"] > 0 and math.isnan(sfa["vs_pallas"])
  verdicts = results["where_it_pays"]
  assert verdicts["vs_pallas_not_measured"] == verdicts["bwd_vs_pallas_not_measured"] == [
      "T=256 d=32 k=8 reference"]
  assert len(verdicts["bwd_vs_cudnn_pays"] + verdicts["bwd_vs_cudnn_does_not"]) == 1
  assert "fwd+bwd vs cuDNN" in (tmp_path / "sfa.md").read_text()


def test_verdict_names_the_closest_configuration_when_none_pays():
  def row(label_k, vs_cudnn):
    return {"variant": sfa_bench.SFA, "seq_len": 8192, "head_dim": 64, "k": label_k, "backend": "triton",
            "vs_cudnn": vs_cudnn}
  rows = [row(8, 1.7), row(16, 1.3), row(32, 2.0)]
  verdicts = sfa_bench.where_it_pays(rows)
  results = {"rows": rows, "where_it_pays": {key: value for key, value in verdicts.items() if "vs_cudnn" in key}}
  assert sfa_bench.verdict_lines(results) == [
      "- forward vs cuDNN: pays at none of 3 measured configurations (closest: T=8192 d=64 k=16 triton at 1.30)."]
  rows[1]["vs_cudnn"] = 0.9
  results["where_it_pays"] = sfa_bench.where_it_pays(rows)
  assert "pays at T=8192 d=64 k=16 triton; does not at T=8192 d=64 k=8 triton, T=8192 d=64 k=32 triton" in "\n".join(
      sfa_bench.verdict_lines(results))
