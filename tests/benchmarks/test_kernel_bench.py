"""benchmarks.kernel_bench on CPU: the table's bookkeeping with stand-in kernels, and Flex's failure rules.

The real contenders (cuDNN, Triton, Mosaic GPU, FlexAttention) need a GPU; here each is replaced by a jnp
stand-in with the same signature, so the rows, ratios, compaction rows and Markdown are checked end to end.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import kernel_bench


def _stand_in(*unused_blocks):
  def kernel(q, k, v, indices, counts, lam):
    del indices, lam
    return jax.nn.dot_product_attention(q, k, v, is_causal=True), jnp.zeros_like(counts)
  return jax.jit(kernel)


@pytest.fixture
def parsed_flags():
  """kernel_bench's own flags (`benchmarks.cli`) at their defaults, as after parsing an empty command line."""
  if not kernel_bench.FLAGS.is_parsed():
    kernel_bench.FLAGS.mark_as_parsed()


def _set_flags(monkeypatch, **values):
  for name, value in values.items():
    monkeypatch.setattr(kernel_bench.FLAGS[name], "value", value)


def test_one_length_gives_every_row_and_ratio(parsed_flags, monkeypatch, tmp_path):
  monkeypatch.setattr(kernel_bench, "cudnn_dense", jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True)))
  monkeypatch.setattr(kernel_bench, "pallas_mha_best", lambda q, k, v: (1.0, "64x64"))
  monkeypatch.setattr(kernel_bench, "ours", lambda block_q, block_k, head_dim: _stand_in())
  monkeypatch.setattr(kernel_bench, "ours_mosaic_gpu", lambda block_q, block_k, head_dim: _stand_in())
  # The Mosaic GPU kernel is "supported" at 64x128 here (a stand-in), and 64x64 is outside --mosaic_blocks.
  real_reason = kernel_bench.mosaic_gpu_reason
  monkeypatch.setattr(kernel_bench, "mosaic_gpu_reason",
                      lambda block, head_dim: None if block == "64x128" else real_reason(block, head_dim))
  _set_flags(monkeypatch, heads=2, head_dim=64, reps=1, flex=False, blocks=["64x64", "64x128"],
             densities=["0.5"])
  rows = kernel_bench.bench_seq_len(256)
  variants = [(row["variant"], row["blocks"]) for row in rows]
  assert ("mosaic_gpu", "64x64") in variants and ("mosaic_gpu_random", "64x128") in variants
  assert ("mosaic_gpu_all_kept", "64x64") not in variants
  mosaic = [row for row in rows if row["variant"].startswith("mosaic_gpu_")]
  assert mosaic and all(row["cta_loads_per_kept"] >= 1.0 for row in mosaic)
  skipped = next(row for row in rows if row["variant"] == "mosaic_gpu")
  assert math.isnan(skipped["ms"]) and "--mosaic_blocks" in skipped["note"]
  for row in rows:
    if row["variant"].endswith(("all_kept", "predicted", "random")):
      cudnn_ms = rows[0]["ms"]
      assert row["vs_cudnn"] == pytest.approx(row["ms"] / cudnn_ms)
      assert row["vs_density_cudnn"] == pytest.approx(row["ms"] / (row["density"] * cudnn_ms))
  compaction = [row for row in rows if row["variant"].startswith("mask_to_kv_indices_")]
  assert [row["variant"] for row in compaction] == ["mask_to_kv_indices_argsort", "mask_to_kv_indices_scatter"] * 2
  assert all(row["identical_to_argsort"] and row["predict_and_compact_vs_cudnn"] > 0 for row in compaction)
  results = dict(environment=dict(gpu="cpu", jax=jax.__version__), heads=2, head_dim=64, reps=1, check=[],
                 rows=rows)
  path = tmp_path / "bench.md"
  kernel_bench.write_markdown(json.loads(json.dumps(results)), str(path))
  text = path.read_text()
  assert "| - | mosaic_gpu | 64x64 | not timed: not in --mosaic_blocks" in text
  assert "| 256 | mosaic_gpu | 64x128 |" in text and "| 256 | triton | 64x64 |" in text
  # The targets table reads the all-kept rows (dense mode) of both kernels, not "-".
  targets = text[text.index("## Targets"):]
  for kernel, block in (("triton", "64x64"), ("mosaic_gpu", "64x128")):
    line = next(line for line in targets.splitlines() if line.startswith(f"| 256 | {kernel} | {block} |"))
    assert float(line.split("|")[4]) > 0


def test_flex_kernel_options_divide_the_blocks():
  for block_q in (64, 128):
    for block_k in (64, 128):
      options = kernel_bench.Flex.kernel_options(block_q, block_k)
      assert block_q % options["fwd_BLOCK_M"] == 0 and block_k % options["fwd_BLOCK_N"] == 0
      assert block_q % options["bwd_BLOCK_M1"] == 0 and block_k % options["bwd_BLOCK_N1"] == 0
      assert block_q % options["bwd_BLOCK_M2"] == 0 and block_k % options["bwd_BLOCK_N2"] == 0
      assert options["bwd_BLOCK_N1"] % options["bwd_BLOCK_M1"] == 0
      assert options["bwd_BLOCK_M2"] % options["bwd_BLOCK_N2"] == 0


def test_flex_falls_back_to_max_autotune_and_never_reports_a_failed_or_eager_time():
  flex = object.__new__(kernel_bench.Flex)
  flex._compiled, flex._first_mode = None, {}
  calls = []

  def function(block_q, block_k, mode):
    calls.append(mode)
    def fn():
      if mode == "default":
        raise RuntimeError("NoValidChoicesError: No choices exist for backend")
      return 2.0
    return fn
  flex._function = function
  result, note = flex._attempt(64, 64, lambda fn: fn(), budget_ms=10.0)
  assert (result, note) == (2.0, "max-autotune-no-cudagraphs") and calls == list(kernel_bench._FLEX_MODES)
  # Settled: the next mask of these blocks starts in the mode that worked.
  calls.clear()
  assert flex._attempt(64, 64, lambda fn: fn(), budget_ms=10.0)[0] == 2.0 and calls == ["max-autotune-no-cudagraphs"]
  # Too slow to be a compiled kernel (an eager fallback's 263 ms): NaN with the reason, in every mode.
  result, note = flex._attempt(128, 128, lambda fn: 263.0, budget_ms=10.0)
  assert result is None and note.count("not a compiled kernel") == 2
  assert np.isnan(kernel_bench._worst([None, math.nan])) and kernel_bench._worst([1.0, math.nan, 2.0]) == 2.0


def test_the_timed_backward_is_the_front_doors_gradient():
  """--backward times `ours_differentiable`; on the interpreter its gradients are the reference's."""
  q, k, v = (jax.random.normal(key, (1, 128, 1, 32), jnp.float32) for key in jax.random.split(jax.random.key(0), 3))
  mask = jnp.asarray(np.tril(np.ones((1, 1, 2, 2), bool)))
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask) ** 2)
  ours = jax.grad(loss(kernel_bench.ours_differentiable(64, 64, backend="interpret")), argnums=(0, 1, 2))(q, k, v)
  reference = jax.grad(loss(kernel_bench.ours_differentiable(64, 64, backend="reference")), argnums=(0, 1, 2))(
      q, k, v)
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(want).max()) > 0


def test_cta_loads_per_kept_counts_the_union_of_a_ctas_two_rows():
  same = np.array([[[[1, 0, 1], [1, 0, 1]]]], bool)          # both rows keep blocks 0 and 2
  disjoint = np.array([[[[1, 0, 0], [0, 1, 0]]]], bool)      # each loads the other's block too
  assert kernel_bench.cta_loads_per_kept(same, 64) == 1.0
  assert kernel_bench.cta_loads_per_kept(disjoint, 64) == 2.0
  assert kernel_bench.cta_loads_per_kept(disjoint, 128) == 1.0
  odd = np.array([[[[1, 1], [1, 0], [0, 1]]]], bool)         # 3 rows: the last CTA has one
  assert kernel_bench.cta_loads_per_kept(odd, 64) == (2 + 1) / (4 / 2)
