"""Reformer's LSH attention (Kitaev et al., 2020), training-free on any model's q and k.

Reformer trains its model with shared query/key projections so that hashing suits it; here the hash is
applied to an untrained-for model's separate q and k, so this approximates the method rather than
reproducing it. Each round draws a random rotation R [head_dim, n_buckets / 2] per query head (from
`seed` and the layer) and hashes a unit vector x to argmax([xR, −xR]); a query and a key that land in
the same bucket in more rounds are more alike. Each query keeps its diagonal, then the keys sharing the
most rounds with it, the most recent first among equals, up to its exact budget (Reformer instead sorts
by bucket and cuts fixed-size chunks, which also fixes the per-query count whatever the bucket sizes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.baselines.features import per_query_head, unit
from afbs_jax.baselines.policy import TokenPolicy, baseline, check_int, random_draw


def lsh_buckets(x: jax.Array, rotations: jax.Array) -> jax.Array:
  """The bucket of every token in every round.

  x: [batch, seq, heads, D]; rotations: [heads, rounds, D, n_buckets / 2] -> int [batch, heads, rounds, seq].
  """
  projected = jnp.einsum("bshd,hrdn->bhrsn", unit(x), rotations, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmax(jnp.concatenate([projected, -projected], axis=-1), axis=-1)


@baseline
class Reformer(TokenPolicy):
  """LSH bucketing by random rotations; queries keep keys from their own buckets first.

  Attributes:
    n_buckets: buckets per hashing round (even, >= 2).
    n_rounds: hashing rounds; more rounds rank keys more finely.

  Sparsity knob: the per-query budget.
  """

  name = "reformer"
  n_buckets: int = 8
  n_rounds: int = 4

  def __post_init__(self):
    super().__post_init__()
    if check_int("n_buckets", self.n_buckets, 2) % 2:
      raise ValueError(f"n_buckets must be an even int >= 2 (buckets come in ± pairs); got "
                       f"{self.n_buckets!r}")
    check_int("n_rounds", self.n_rounds, 1)

  def prepare(self, q, k, layer):
    heads, head_dim = q.shape[2], q.shape[3]
    rotations = random_draw(jax.random.normal, self.seed, layer,
                            (heads, self.n_rounds, head_dim, self.n_buckets // 2))
    return (rotations, lsh_buckets(per_query_head(k, heads), rotations)), None  # k: [batch, heads, rounds, S]

  def chunk_scores(self, q_rows, k, chunk, context, carry):
    del chunk
    rotations, k_buckets = context
    q_buckets = lsh_buckets(q_rows, rotations)                     # [batch, heads, rounds, C]
    shared = sum((q_buckets[:, :, r, :, None] == k_buckets[:, :, r, None, :]).astype(jnp.float32)
                 for r in range(self.n_rounds))                    # [batch, heads, C, S]
    # Recency in [0, 1) orders keys with equal shared rounds, never across counts.
    return shared + np.arange(k.shape[1])[None, :] / k.shape[1], carry
