"""benchmarks.kernel_profile on CPU: target parsing, ncu CSV parsing and the report (ncu runs on a GPU)."""

from __future__ import annotations

import math

import pytest

from benchmarks import kernel_profile

_DETAILS = '''==PROF== Connected to process 1
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python","h","loop_fusion","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","3.10"
"0","1","python","h","loop_fusion","1","7","(128, 1, 1)","(8, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","1.5"
"1","1","python","h","attention_kernel","1","7","(384, 1, 1)","(32, 256, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","msecond","2.50"
"1","1","python","h","attention_kernel","1","7","(384, 1, 1)","(32, 256, 1)","0","9.0","GPU Speed Of Light Throughput","Compute (SM) Throughput","%","61.25"
"1","1","python","h","attention_kernel","1","7","(384, 1, 1)","(32, 256, 1)","0","9.0","Launch Statistics","Registers Per Thread","register/thread","168"
"1","1","python","h","attention_kernel","1","7","(384, 1, 1)","(32, 256, 1)","0","9.0","Occupancy","Achieved Occupancy","%","18.70"
'''
_RAW = '''"ID","Kernel Name","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","dram__bytes.sum"
"","","%","ratio","ratio","byte"
"0","loop_fusion","0","0.1","2.0","1,024"
"1","attention_kernel","55.5","3.25","0.75","1,048,576"
'''


def test_parse_target_accepts_the_documented_forms_and_rejects_others():
  assert kernel_profile.parse_target("cudnn")["backend"] == "cudnn"
  assert kernel_profile.parse_target("mosaic_gpu:64x128:0.15") == dict(
      backend="mosaic_gpu", block_q=64, block_k=128, density=0.15)
  for bad in ("mosaic:64x128:0.15", "triton:64:0.3", "triton:64x64:0", "triton:64x64:1.5"):
    with pytest.raises(ValueError, match="expected 'cudnn'"):
      kernel_profile.parse_target(bad)


def test_the_longest_kernel_is_summarised_with_its_metrics_and_stalls():
  details = kernel_profile.parse_details(_DETAILS)
  assert set(details) == {"0", "1"}
  summary = kernel_profile.summarise(details, kernel_profile.parse_raw(_RAW))
  assert summary["kernel"] == "attention_kernel"   # 2.5 ms beats 3.1 µs: units are converted
  assert summary["duration_us"] == pytest.approx(2500.0)
  assert summary["metrics"]["SM throughput %"] == dict(value=61.25, unit="%")
  assert summary["metrics"]["registers / thread"]["value"] == 168
  assert summary["metrics"]["DRAM throughput %"] is None   # absent from this ncu output
  assert list(summary["stalls"]) == ["barrier", "long_scoreboard"]   # largest first
  assert summary["stalls"]["barrier"] == pytest.approx(3.25)
  assert summary["tensor_pipe"] == {
      "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": pytest.approx(55.5)}
  assert summary["kernels_in_process"] == 2


def test_no_kernels_is_a_clear_error():
  with pytest.raises(RuntimeError, match="no kernels"):
    kernel_profile.summarise({}, {})


def test_markdown_puts_targets_side_by_side():
  summary = kernel_profile.summarise(kernel_profile.parse_details(_DETAILS), kernel_profile.parse_raw(_RAW))
  other = dict(summary, target="cudnn", duration_us=1500.0, stalls={"barrier": 0.5})
  results = dict(environment=dict(gpu="H200", jax="0.11.2", ncu="2025.1"), seq_len=32768, heads=32,
                 head_dim=128, profiles=[dict(summary, target="mosaic_gpu:128x128:1.0"), other])
  text = kernel_profile.markdown(results)
  assert "| metric | mosaic_gpu:128x128:1.0 | cudnn |" in text
  assert "| duration µs | 2500 | 1500 |" in text
  assert "| SM throughput % | 61.2 | 61.2 |" in text or "| SM throughput % | 61.3 | 61.3 |" in text
  assert "| stall `long_scoreboard` (cycles/inst) | 0.75 | - |" in text
  assert not math.isnan(summary["duration_us"])
