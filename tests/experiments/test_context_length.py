"""experiments.context_length in quick mode: the schema, the fixed window's band and sane numbers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from afbs_jax import baselines
from afbs_jax.baselines.layout import layout
from experiments import common, context_length


def test_quick_run_writes_curves(tmp_path, work_dir):
  payload = context_length.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  written = json.loads((tmp_path / "context_length_quick.json").read_text())
  assert written["experiment"] == "context_length" and written["setting"]["name"] == "quick"
  assert (tmp_path / "context_length_quick.png").stat().st_size > 0
  assert context_length.discuss(payload) in (tmp_path / "context_length_quick.md").read_text()
  rows = written["rows"]
  assert [row["context"] for row in rows] == list(context_length.CONTEXTS["quick"])
  width = payload["window_width_tokens"]
  assert width == payload["window_width_blocks"] * common.QUICK.block_size > 0
  for row in rows:
    assert row["dense"]["sparsity"] == 0.0 and row["dense"]["delta_ppl"] == 0.0
    for name in context_length.METHODS:
      assert np.isfinite(row[name]["ppl"]) and row[name]["ppl"] > 1.0, (row["context"], name)
    assert 0.0 <= row["afbs"]["sparsity"] < 1.0
    # A fixed band keeps everything up to its width and drops blocks beyond it.
    assert (row["window"]["sparsity"] == 0.0) == (row["context"] <= width), row["context"]
  tuned_row = next(row for row in rows if row["context"] == common.QUICK.high_len)
  assert tuned_row["afbs"]["sparsity"] == payload["afbs_sparsity_at_tuned_length"]


@pytest.mark.parametrize("length, block, width", [(256, 16, 13), (1000, 64, 5), (128, 16, 3), (64, 16, 8)])
def test_band_sparsity_is_exactly_the_window_baselines_band(length, block, width):
  sparsity = context_length.band_sparsity(width, length, block)
  q = jnp.zeros((1, length, 2, 8))
  kept_per_row = np.asarray(baselines.get("window", sparsity=sparsity, block_size=block).block_mask(q, q))[0, 0].sum(1)
  valid_per_row = layout(length, length, block).valid.sum(axis=1)
  np.testing.assert_array_equal(kept_per_row, np.minimum(valid_per_row, width))
  if sparsity > 0.0:  # Wider bands than the context are all dense; the narrowest is returned.
    assert context_length.band_width(sparsity, length, block) == width
