"""The Routing Transformer (Roy et al., 2021), training-free: spherical k-means over q and k per head.

The paper learns its centroids online (an exponential moving average over training steps) together with
the model; here a few Lloyd iterations cluster the call's own unit queries and keys, from random unit
centroids drawn per head and layer from `seed`, so this approximates the method rather than reproducing
it. Each query keeps its diagonal, then the keys of its own cluster, then the others, each group ordered
by affinity to the query's centroid, up to its exact budget: the balanced routing of the paper's code,
where each centroid takes its nearest keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afbs_jax.baselines.features import per_query_head, unit
from afbs_jax.baselines.policy import TokenPolicy, baseline, check_int, random_draw

_HIGHEST = jax.lax.Precision.HIGHEST


def lloyd_step(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """One spherical k-means step.

  Args:
    points: unit vectors, f32 [batch, n, heads, D].
    centroids: unit vectors, f32 [batch, heads, clusters, D].

  Returns:
    The normalised mean of each cluster's points, f32 [batch, heads, clusters, D]; an empty cluster
    keeps its centroid.
  """
  similarity = jnp.einsum("bnhd,bhcd->bhnc", points, centroids, precision=_HIGHEST)
  members = jax.nn.one_hot(jnp.argmax(similarity, axis=-1), centroids.shape[2])  # [batch, heads, n, C]
  sums = jnp.einsum("bhnc,bnhd->bhcd", members, points, precision=_HIGHEST)
  return jnp.where(members.sum(axis=2)[..., None] > 0, unit(sums), centroids)


@baseline
class Routing(TokenPolicy):
  """k-means routing of queries and keys; queries keep keys from their own cluster first.

  Attributes:
    n_clusters: centroids per head.
    n_iters: Lloyd iterations per call.

  Sparsity knob: the per-query budget.
  """

  name = "routing"
  n_clusters: int = 4
  n_iters: int = 3

  def __post_init__(self):
    super().__post_init__()
    check_int("n_clusters", self.n_clusters, 1)
    check_int("n_iters", self.n_iters, 0)

  def prepare(self, q, k, layer):
    batch, _, heads, head_dim = q.shape
    q_unit, k_unit = unit(q), unit(per_query_head(k, heads))       # [batch, T | S, heads, D]
    initial = unit(random_draw(jax.random.normal, self.seed, layer, (heads, self.n_clusters, head_dim)))
    centroids = jnp.broadcast_to(initial, (batch, *initial.shape))
    points = jnp.concatenate([q_unit, k_unit], axis=1)             # Clustered on all T queries at once.
    for _ in range(self.n_iters):
      centroids = lloyd_step(points, centroids)
    k_cluster = jnp.argmax(jnp.einsum("bshd,bhcd->bhsc", k_unit, centroids, precision=_HIGHEST), axis=-1)
    return (centroids, k_unit, k_cluster), None

  def chunk_scores(self, q_rows, k, chunk, context, carry):
    del k, chunk
    centroids, k_unit, k_cluster = context
    q_cluster = jnp.argmax(jnp.einsum("bthd,bhcd->bhtc", unit(q_rows), centroids, precision=_HIGHEST),
                           axis=-1)
    q_centroid = jnp.take_along_axis(centroids, q_cluster[..., None], axis=2)   # [batch, heads, C, D]
    affinity = jnp.einsum("bhtd,bshd->bhts", q_centroid, k_unit, precision=_HIGHEST)   # in [-1, 1]
    same_cluster = q_cluster[..., :, None] == k_cluster[..., None, :]
    # Affinity lies in [-1, 1]: the own cluster always ranks first.
    return affinity + 3.0 * same_cluster, carry
