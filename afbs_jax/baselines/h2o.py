"""H2O (Zhang et al., 2023): each query keeps recent keys plus "heavy hitters", the keys that earlier
queries attended to most.

Query t ranks keys by A_t(u) = Σ_{t' < t} P[t', u], the true attention probability mass accumulated over
the earlier queries only, so no query uses its own or a later query's attention. Half of each row's
budget (rounded up, the diagonal included) is the recent window, the other half heavy hitters, as in the
paper's equal split. Unlike the paper's greedy KV-cache eviction (an evicted key never returns, and mass is
accumulated from the sparse attention), each query re-selects from the dense accumulated mass.

Query rows run in chunks (`afbs_jax.baselines.chunks`) with the mass of all earlier chunks carried along.
The sums go in fixed groups of `chunks.ROW_MULTIPLE` rows, the groups in order, so the mass (and the
mask) is the same at every chunk size; it matches a single cumulative sum over all T rows up to float
rounding order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afbs_jax.baselines.chunks import ROW_MULTIPLE
from afbs_jax.baselines.features import masked_probs
from afbs_jax.baselines.policy import TokenPolicy, baseline


@baseline
class H2O(TokenPolicy):
  """Recent window plus heavy hitters per query. Sparsity knob: the per-query budget, split in half."""

  name = "h2o"

  def prepare(self, q, k, layer):
    del layer
    return None, jnp.zeros((q.shape[0], q.shape[2], k.shape[1]), jnp.float32)  # Mass of rows before.

  def chunk_scores(self, q_rows, k, chunk, context, carry):
    del context
    accumulated, carry = earlier_mass(masked_probs(q_rows, k, chunk.valid), carry)
    recent = chunk.distance < ((chunk.counts + 1) // 2)[:, None]   # ceil(budget / 2) most recent keys
    return jnp.where(recent & chunk.valid, jnp.inf, accumulated), carry


def earlier_mass(probs: jax.Array, carry: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per query row, `carry` plus the chunk's probabilities of the rows before it, and the next carry.

  Args:
    probs: f32 [batch, heads, C, S], C a multiple of ROW_MULTIPLE.
    carry: f32 [batch, heads, S], the mass of every earlier row.

  Returns:
    (f32 [batch, heads, C, S], f32 [batch, heads, S]).
  """
  batch, heads, size, kv_len = probs.shape
  groups = probs.reshape(batch, heads, size // ROW_MULTIPLE, ROW_MULTIPLE, kv_len)
  # Within a group, rows before each row. Shifting (not subtracting) keeps a group's first row exactly at
  # its start, so the very first query's mass is exactly 0 and its ties break by column.
  within = jnp.cumsum(groups, axis=3)
  within = jnp.concatenate([jnp.zeros_like(within[..., :1, :]), within[..., :-1, :]], axis=3)
  starts = []
  for total in jnp.unstack(groups.sum(axis=3), axis=2):  # Groups in order: the same sums at any C.
    starts.append(carry)
    carry = carry + total
  accumulated = jnp.stack(starts, axis=2)[..., None, :] + within
  return accumulated.reshape(probs.shape), carry
