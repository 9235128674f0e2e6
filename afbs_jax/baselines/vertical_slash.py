"""Vertical-slash on key blocks: MInference's pattern (Jiang et al., 2024), as The Sparse Frontier compares it.

Long-context attention concentrates on a few key columns (sinks, salient tokens: *vertical* lines) and a
few fixed query-key offsets (local and periodic structure: *slash* lines). MInference finds both from the
true attention of the last queries only (its last_q = 64), the queries that ask the question; here the
observation window is the last query block. Its probabilities P [rows, S] give

  vertical[j] = Σ_t Σ_{u in key block j} P[t, u]              the mass on block j's columns, and
  slash[d]    = Σ_t Σ_{o in [d · block, (d + 1) · block)} P[t, own_t − o]   the mass along offsets o,

both shares of the window's total mass (each sums to the window's row count). A slash band of offsets
[d · block, (d + 1) · block) crosses the tiles at distance d and d + 1 of a block-aligned row, so a tile
at distance d scores max(slash[d − 1], slash[d]); its priority is the larger of that and its column's
vertical score. Each query block then keeps its exact budget in that order (`afbs_jax.baselines.budget`),
its diagonal first, so the block-sparsity target is met exactly. MInference instead gives verticals and
slashes separate budgets (e.g. 1000 and 6096 lines) at token level; one shared priority is the block-level
analogue with a single knob.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.baselines.features import masked_probs
from afbs_jax.baselines.layout import token_valid
from afbs_jax.baselines.policy import BlockPolicy, baseline


@baseline
class VerticalSlash(BlockPolicy):
  """Per query block, its diagonal block and the tiles on the strongest vertical or slash lines of the
  last query block's true attention. Sparsity knob: k (k or k + 1 blocks per row)."""

  name = "vertical_slash"
  traceable = True

  def scores(self, q, k, grid, counts, layer):
    del counts, layer
    vertical, slash = line_mass(q, k, block=self.block_size)             # [batch, heads, n_k] each
    crossing = jnp.maximum(slash, jnp.pad(slash, [(0, 0), (0, 0), (1, 0)])[..., :-1])  # max(slash[d-1], slash[d])
    distance = np.clip(grid.distance, 0, grid.valid.shape[1] - 1)       # invalid cells: ignored by `select`
    return jnp.maximum(vertical[:, :, None, :], crossing[:, :, distance])


@functools.partial(jax.jit, static_argnames="block")  # Eagerly: one compile per shape.
def line_mass(q: jax.Array, k: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """The last query block's attention mass per vertical block and per slash band.

  q: [batch, T, heads, D]; k: [batch, S, kv_heads, D].

  Returns:
    (vertical, slash), f32 [batch, heads, n_k_blocks] each: vertical[j] the window's mass on key block j,
    slash[d] its mass at query-key offsets [d · block, (d + 1) · block) (offset 0: a query's own key).
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  rows, n_k = min(block, q_len), math.ceil(kv_len / block)
  probs = masked_probs(q[:, -rows:], k, token_valid(q_len, kv_len)[-rows:])       # [batch, heads, rows, S]
  pad = [(0, 0), (0, 0), (0, n_k * block - kv_len)]
  vertical = jnp.pad(probs.sum(axis=2), pad).reshape(*probs.shape[:2], n_k, block).sum(-1)
  own = np.arange(q_len - rows, q_len) + kv_len - q_len                            # [rows] own key positions
  key = own[:, None] - np.arange(kv_len)[None, :]                                  # [rows, S]: key at offset o
  along = jnp.take_along_axis(probs, jnp.broadcast_to(np.clip(key, 0, kv_len - 1), probs.shape), axis=-1)
  per_offset = jnp.where(key >= 0, along, 0.0).sum(axis=2)                         # [batch, heads, S]
  slash = jnp.pad(per_offset, pad).reshape(*probs.shape[:2], n_k, block).sum(-1)
  return vertical, slash
