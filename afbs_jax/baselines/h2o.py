"""H2O (Zhang et al., 2023): each query keeps recent keys plus "heavy hitters", the keys that earlier
queries attended to most.

Query t ranks keys by A_t(u) = Σ_{t' < t} P[t', u], the true attention probability mass accumulated over
the earlier queries only, so no query uses its own or a later query's attention. Half of each row's
budget (rounded up, the diagonal included) is the recent window, the other half heavy hitters, as in the
paper's equal split. Unlike the paper's greedy KV-cache eviction (an evicted key never returns, and mass is
accumulated from the sparse attention), each query re-selects from the dense accumulated mass.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from afbs_jax.baselines.features import causal_probs
from afbs_jax.baselines.policy import TokenPolicy, baseline


@baseline
class H2O(TokenPolicy):
  """Recent window plus heavy hitters per query. Sparsity knob: the per-query budget, split in half."""

  name = "h2o"

  def scores(self, q, k, grid, counts, layer):
    del layer
    probs = causal_probs(q, k)                           # [batch, heads, T, S]
    # Mass from queries t' < t. Shifting (not subtracting) keeps the first row exactly 0, so its ties
    # break by column the same way eagerly and under jit.
    accumulated = jnp.cumsum(probs, axis=2)
    accumulated = jnp.concatenate([jnp.zeros_like(accumulated[..., :1, :]), accumulated[..., :-1, :]], axis=2)
    recent = grid.distance < -(-counts // 2)[:, None]    # ceil(budget / 2) most recent keys
    return jnp.where(recent & grid.valid, np.inf, accumulated)
