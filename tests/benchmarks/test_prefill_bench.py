"""benchmarks.prefill_bench: the density mapping, the masks, and a quick CPU run from a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np

from afbs_jax import checkpoint
from benchmarks import prefill_bench


def test_map_densities_aligns_depth_ends_and_spreads_each_source_head_over_a_run():
  source = np.arange(30 * 9, dtype=float).reshape(30, 9)
  mapped = prefill_bench.map_densities(source, 32, 32)
  assert mapped.shape == (32, 32)
  np.testing.assert_array_equal(mapped[0], source[0, np.arange(32) * 9 // 32])
  np.testing.assert_array_equal(mapped[-1], source[-1, np.arange(32) * 9 // 32])
  assert sorted(set(mapped[0].tolist())) == source[0].tolist()             # every source head used
  layers = mapped[:, 0] // 9
  assert (np.diff(layers) >= 0).all() and set(layers.astype(int)) == set(range(30))
  np.testing.assert_array_equal(prefill_bench.map_densities(source, 30, 9), source)   # identity


def test_random_masks_keep_the_diagonal_and_hit_the_density():
  densities = np.asarray([[0.3, 0.6], [1.0, 0.0]])
  masks = np.asarray(prefill_bench.random_masks(0, densities, seq_len=4096, block_q=64, block_k=64))
  valid, full = prefill_bench.block_geometry(4096, 64, 64)
  assert masks.shape == (2, 1, 2) + valid.shape and not (masks & ~valid).any()
  assert (masks[..., valid & ~full]).all()                                   # the diagonal always kept
  achieved = masks.sum(axis=(1, 3, 4)) / valid.sum()
  assert abs(achieved[0, 0] - 0.3) < 0.02 and abs(achieved[0, 1] - 0.6) < 0.02 and achieved[1, 0] == 1.0
  assert achieved[1, 1] == (valid & ~full).sum() / valid.sum()               # density 0: the diagonal only


def test_quick_run_writes_every_policy_from_a_tiny_checkpoint(tmp_path):
  tuned = checkpoint.empty_tuned(3, 2, {"tau": 1.0, "theta": 1.0, "lam": -30.0},
                                 {"model_name": "toy", "block_size": 64})
  tuned.sparsity[:] = [[0.5, 0.7], [0.6, 0.8], [0.9, 0.9]]                  # layer 2 untuned: ignored
  tuned.metadata["layers_done"] = 2
  checkpoint.save_tuned(tmp_path / "run" / "checkpoint", tuned)
  out = tmp_path / "prefill.json"
  prefill_bench.run(prefill_bench.quick_settings(str(tmp_path / "run")), out=str(out))
  results = json.loads(out.read_text())
  assert results["densities_source"]["layers_done"] == 2 and "Random weights" in results["note"]
  rows = results["lengths"]["512"]
  assert set(rows) == {"dense", "borrowed", "uniform_0.3"}
  # 2 source layers -> 2 layers; 2 source heads -> 4 heads: [[.5, .5, .3, .3], [.4, .4, .2, .2]] densities.
  assert abs(rows["borrowed"]["target_density"] - 0.35) < 1e-6
  for name, row in rows.items():
    assert row["forward_s"] > 0 and 0 < row["attention_share"] and row["tokens_per_s"] == 512 / row["forward_s"]
  assert rows["dense"]["speedup"] == 1.0 and 0 < rows["uniform_0.3"]["block_density"] < 1
  text = (tmp_path / "prefill.md").read_text()
  assert "| 512 | borrowed |" in text and results["environment"]["device_kind"] in text
