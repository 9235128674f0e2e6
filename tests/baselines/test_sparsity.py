"""The shared definitions: causal layout, token and block sparsity, mask expansion, exact budgets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from afbs_jax.baselines import budget, layout, sparsity
from tests.baselines import _oracles


@pytest.mark.parametrize("q_len, kv_len, block", [(64, 64, 16), (48, 112, 16), (40, 100, 16), (7, 9, 1),
                                                  (100, 40, 16)])
def test_layout_matches_token_geometry(q_len, kv_len, block):
  grid = layout.layout(q_len, kv_len, block)
  valid, distance, diagonal = _oracles.geometry(q_len, kv_len, block)
  np.testing.assert_array_equal(grid.valid, valid)
  np.testing.assert_array_equal(grid.diagonal, diagonal)
  np.testing.assert_array_equal(np.where(valid, grid.distance, 0), np.where(valid, distance, 0))


def test_layout_at_token_level_is_bottom_right_causal():
  grid = layout.layout(3, 5, 1)
  np.testing.assert_array_equal(grid.valid, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(np.argwhere(grid.diagonal), [[0, 2], [1, 3], [2, 4]])
  np.testing.assert_array_equal(grid.distance[2], [4, 3, 2, 1, 0])


def test_token_and_block_sparsity_on_a_literal_mask():
  # T = S = 4, block 2: 10 causal-valid pairs; tiles (0,0), (1,0), (1,1) are valid, (0,1) is not.
  mask = np.zeros((1, 1, 4, 4), bool)
  mask[0, 0, 0, 0] = mask[0, 0, 3, 3] = True
  mask[0, 0, 0, 3] = True                      # above the diagonal: never counted
  np.testing.assert_allclose(sparsity.token_sparsity(jnp.asarray(mask)), [[1 - 2 / 10]])
  np.testing.assert_allclose(sparsity.block_sparsity(jnp.asarray(mask), 2), [[1 - 2 / 3]])
  mask[0, 0, 2, 1] = True                      # a second pair in tile (1, 0): tiles, not pairs, count
  np.testing.assert_allclose(sparsity.block_sparsity(jnp.asarray(mask), 2), [[1 - 3 / 3]])
  np.testing.assert_allclose(sparsity.token_sparsity(jnp.asarray(mask)), [[1 - 3 / 10]])


def test_expand_blocks_keeps_causal_pairs_of_kept_tiles():
  block_mask = jnp.asarray([[[[True, False], [False, True]]]])
  tokens = np.asarray(sparsity.expand_blocks(block_mask, 2, 4, 4))[0, 0]
  np.testing.assert_array_equal(tokens, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_check_sparsity_rejects(value):
  with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
    sparsity.check_sparsity(value)


@pytest.mark.parametrize("total", [0, 5, 37, 100, 136, 200])
def test_row_budgets_are_exact_and_even(total):
  available = np.arange(1, 17)                 # a causal square: row i has i + 1 blocks
  forced = np.ones(16, int)
  counts = budget.row_budgets(available, forced, total)
  assert counts.sum() == min(max(total, 16), 136)
  assert np.all((forced <= counts) & (counts <= available))
  unsaturated = counts[counts < available]    # water-filling: k or k + 1 below saturation, none above
  if unsaturated.size:
    assert unsaturated.max() - unsaturated.min() <= 1 and counts.max() <= unsaturated.max()
  np.testing.assert_array_equal(counts, _oracles.budgets(available, forced, 1 - counts.sum() / 136))


def test_keep_top_is_exact_with_ties_and_forced_cells():
  valid = np.tril(np.ones((3, 4), bool), 1)
  forced = np.eye(3, 4, 1, dtype=bool)
  score = np.zeros((3, 4))                     # all tied: lower columns win after the forced cell
  keep = budget.keep_top(score, valid, forced, np.array([1, 2, 3]))
  np.testing.assert_array_equal(keep, [[0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]])
  keep = budget.keep_top(jnp.asarray([[0.0, 5.0, 1.0, 9.0]] * 3), valid, forced, np.array([2, 2, 2]))
  np.testing.assert_array_equal(np.asarray(keep), [[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1]])
