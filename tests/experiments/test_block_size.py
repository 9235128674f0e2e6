"""experiments.block_size in quick mode: one checkpoint per block size, the schema, and the timing path."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.model import SpargeAttention
from experiments import block_size, common


def test_quick_run_tunes_each_block_size(tmp_path, work_dir):
  payload = block_size.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  written = json.loads((tmp_path / "block_size_quick.json").read_text())
  assert written["experiment"] == "block_size" and written["setting"]["name"] == "quick"
  assert (tmp_path / "block_size_quick.png").stat().st_size > 0
  assert block_size.discuss(payload) in (tmp_path / "block_size_quick.md").read_text()
  rows = written["rows"]
  assert [row["block_size"] for row in rows] == list(block_size.BLOCK_SIZES["quick"])
  checkpoints = [row["checkpoint"] for row in rows]
  assert len(set(checkpoints)) == len(rows) and not any(os.path.isabs(path) for path in checkpoints)
  assert all(os.path.isdir(os.path.join(work_dir, path)) for path in checkpoints)
  for row in rows:
    assert np.isfinite(row["ppl"]) and row["ppl"] > 1.0
    assert 0.0 <= row["sparsity"] < 1.0 and 0.0 <= row["calibration_sparsity"] < 1.0
    assert np.isclose(row["delta_ppl"], row["ppl"] - written["dense_ppl"])
  if jax.default_backend() == "cpu":
    assert written["timing_note"] and written["dense_ms"] is None
    assert all("tuned_mask_ms" not in row for row in rows)


def test_kernel_times_runs_on_any_backend(monkeypatch):
  monkeypatch.setattr(block_size, "WARMUP", 1)
  monkeypatch.setattr(block_size, "REPS", 2)
  q, k, v = (jax.random.normal(jax.random.key(seed), (1, 64, 2, 16)) for seed in range(3))
  policy = SpargeAttention.constant(2, 2, tau=0.9, theta=0.0, lam=-5.0, block_q=16, block_k=16,
                                    backend="reference")
  times = block_size.kernel_times(policy, 1, q, k, v)
  assert set(times) == {"layer_sparsity", "tuned_mask_ms", "all_blocks_ms", "predict_and_kernel_ms"}
  assert 0.0 <= times["layer_sparsity"] < 1.0
  assert all(times[name] > 0.0 for name in ("tuned_mask_ms", "all_blocks_ms", "predict_and_kernel_ms"))
  assert block_size.median_ms(lambda x: x + 1, jnp.ones(3)) > 0.0
