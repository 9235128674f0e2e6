"""Fixed block patterns: local window, StreamingLLM, Longformer and the Sparse Transformer's strided pattern.

Each pattern is a static priority over (query block, key block) cells, a function of the causal
distance d (0 is the block holding the row's own position) and the key block j. Every query block keeps
its budgeted number of blocks in priority order (`afbs_jax.baselines.budget`), so the target block
sparsity is met exactly at any length; the masks are numpy constants under jit.
"""

from __future__ import annotations

import math

import numpy as np

from afbs_jax.baselines.policy import BlockPolicy, baseline, check_int


@baseline
class Window(BlockPolicy):
  """Local attention: each query block keeps its most recent key blocks, a band along the diagonal.

  Sparsity knob: the band width, w or w + 1 blocks per row.
  """

  name = "window"

  def scores(self, q, k, grid, counts, layer):
    del q, k, counts, layer  # A fixed pattern: only the geometry matters.
    return -grid.distance


@baseline
class StreamingLLM(BlockPolicy):
  """StreamingLLM (Xiao et al., 2024): the attention sink (key block 0, which holds the paper's four sink
  tokens) plus the most recent key blocks.

  Sparsity knob: the recent window, as in `Window`.
  """

  name = "streamingllm"

  def scores(self, q, k, grid, counts, layer):
    del q, k, counts, layer
    return np.where(grid.columns == 0, 1, -grid.distance)


@baseline
class Longformer(BlockPolicy):
  """Longformer (Beltagy et al., 2020) for causal prefill: a sliding window plus global tokens.

  The global tokens are the first key blocks (under causality a global query's "attend to everything"
  is already implied, so only the global columns matter). Window and global set grow together: a block
  at distance d enters at level d, global column j at level `window_per_global` · j, so about
  1 / (1 + window_per_global) of the kept blocks are global (ties go to the window).

  Sparsity knob: the level, i.e. window width and number of global blocks together.
  """

  name = "longformer"
  window_per_global: int = 1

  def __post_init__(self):
    super().__post_init__()
    check_int("window_per_global", self.window_per_global, 1)

  def scores(self, q, k, grid, counts, layer):
    del q, k, counts, layer
    level = np.minimum(grid.distance, self.window_per_global * grid.columns)
    return -(level * (grid.valid.shape[1] + 1) + grid.distance)


@baseline
class SparseTransformer(BlockPolicy):
  """The Sparse Transformer's strided pattern (Child et al., 2019) on key blocks.

  With stride l = round(sqrt(n_k_blocks)) (the paper's l ≈ √n), a query block attends the l most recent
  key blocks (local head) and every l-th block before them (strided head). The paper keeps all of both,
  which fixes the density at O(1/√n); here each row spends its budget alternately on the next local and
  the next strided block (d = 0, l, 1, 2l, 2, 3l, ...), and a budget larger than the whole pattern fills
  the remaining blocks by distance.

  Sparsity knob: how far down the alternating local/strided order each row goes.
  """

  name = "sparse_transformer"

  def scores(self, q, k, grid, counts, layer):
    del q, k, counts, layer
    d, n_k = grid.distance, grid.valid.shape[1]
    stride = max(1, round(math.sqrt(n_k)))
    local = d < stride
    strided = (d % stride == 0) & ~local
    return -np.where(local, 2 * d, np.where(strided, 2 * (d // stride) - 1, 2 * n_k + d))
