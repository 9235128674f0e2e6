"""benchmarks.kernel_profile on CPU: target parsing, ncu CSV parsing and the report (ncu runs on a GPU)."""

from __future__ import annotations

import math

import pytest

from benchmarks import kernel_profile

_RAW = '''==PROF== Connected to process 1
"ID","Kernel Name","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed","launch__registers_per_thread","sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","dram__bytes.sum"
"","","us","%","register/thread","%","ratio","ratio","byte"
"0","loop_fusion","3.10","1.5","16","0","0.1","2.0","1,024"
"1","entry_mosaic_gpu_kernel","2,500.00","61.25","168","55.5","3.25","0.75","1,048,576"
"2","entry_mosaic_gpu_kernel","2,400.00","60.00","168","55.0","3.00","0.70","1,048,576"
'''


def test_parse_target_accepts_the_documented_forms_and_rejects_others():
  assert kernel_profile.parse_target("cudnn")["backend"] == "cudnn"
  assert kernel_profile.parse_target("mosaic_gpu:64x128:0.15") == dict(
      backend="mosaic_gpu", block_q=64, block_k=128, density=0.15)
  for bad in ("mosaic:64x128:0.15", "triton:64:0.3", "triton:64x64:0", "triton:64x64:1.5"):
    with pytest.raises(ValueError, match="expected 'cudnn'"):
      kernel_profile.parse_target(bad)


def test_the_longest_launch_is_summarised_with_its_metrics_and_stalls():
  launches = kernel_profile.parse_raw(_RAW)
  assert [launch["name"] for launch in launches] == ["loop_fusion"] + ["entry_mosaic_gpu_kernel"] * 2
  summary = kernel_profile.summarise(launches)
  assert summary["kernel"] == "entry_mosaic_gpu_kernel"
  assert summary["duration_us"] == pytest.approx(2500.0)   # thousands separators read, the longer launch
  assert summary["metrics"]["SM throughput %"] == pytest.approx(61.25)
  assert summary["metrics"]["registers / thread"] == 168
  assert math.isnan(summary["metrics"]["DRAM throughput %"])   # absent from this ncu output
  assert list(summary["stalls"]) == ["barrier", "long_scoreboard"]   # largest first
  assert summary["stalls"]["barrier"] == pytest.approx(3.25)
  assert summary["tensor_pipe"] == {
      "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": pytest.approx(55.5)}
  assert summary["launches"] == 3


def test_milliseconds_are_converted():
  text = _RAW.replace('"us","%"', '"ms","%"')
  assert kernel_profile.summarise(kernel_profile.parse_raw(text))["duration_us"] == pytest.approx(2.5e6)


def test_no_kernels_is_a_clear_error():
  with pytest.raises(RuntimeError, match="no kernels"):
    kernel_profile.summarise([])


def test_markdown_puts_targets_side_by_side():
  summary = kernel_profile.summarise(kernel_profile.parse_raw(_RAW))
  other = dict(summary, target="cudnn", density=1.0, duration_us=1500.0, stalls={"barrier": 0.5})
  results = dict(environment=dict(gpu="H200", jax="0.11.2", ncu="2025.1"), seq_len=32768, heads=32,
                 head_dim=128, profiles=[dict(summary, target="mosaic_gpu:128x128:0.5", density=0.5), other])
  text = kernel_profile.markdown(results)
  assert "| metric | mosaic_gpu:128x128:0.5 | cudnn |" in text
  assert "| vs cuDNN | 1.67 | 1.00 |" in text
  assert "| vs density · cuDNN | 3.33 | 1.00 |" in text
  assert "| duration µs | 2500 | 1500 |" in text
  assert "| registers / thread | 168 | 168 |" in text
  assert "| DRAM throughput % | - | - |" in text
  assert "| stall `long_scoreboard` (warps per issue) | 0.75 | - |" in text
