"""Random block patterns: `random` (random key blocks) and `sparse_sink` (the sink block plus random ones).

Each query block keeps its diagonal block and then exactly its budgeted number of random key blocks,
drawn per head and per layer from `seed` (the same for every batch element), BigBird-style.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.baselines.layout import Layout
from afbs_jax.baselines.policy import BlockPolicy, baseline, random_draw


def random_scores(seed: int, layer, heads: int, grid: Layout) -> np.ndarray | jax.Array:
  """Uniform priorities, f32 [1, heads, rows, cols]: a random order of each row's blocks (numpy when the
  layer is concrete, see `random_draw`)."""
  return random_draw(jax.random.uniform, seed, layer, (1, heads, *grid.valid.shape))


@baseline
class RandomBlocks(BlockPolicy):
  """Random key blocks per query block (diagonal kept). Sparsity knob: the number of random blocks."""

  name = "random"

  def scores(self, q, k, grid, counts, layer):
    del k, counts
    return random_scores(self.seed, layer, q.shape[2], grid)


@baseline
class SparseSink(BlockPolicy):
  """The attention sink (key block 0) plus random key blocks per query block (diagonal kept).

  Sparsity knob: the number of random blocks.
  """

  name = "sparse_sink"

  def scores(self, q, k, grid, counts, layer):
    del k, counts
    scores = random_scores(self.seed, layer, q.shape[2], grid)
    xp = np if isinstance(scores, np.ndarray) else jnp
    return xp.where(grid.columns == 0, 2.0, scores)
