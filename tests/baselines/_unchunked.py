"""The token-level baselines as they were before chunking, kept as a test oracle.

Every function builds the full [batch, heads, T, S] arrays in one piece and ranks with a double stable
argsort, exactly as `afbs_jax.baselines` did before it ran query rows in chunks; it reuses the library
only for what chunking did not touch (logits, hashing, Lloyd steps, budgets, layout, masked attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.baselines import budget, features, layout, policy, reformer, routing, sparsity


def keep_top(score, valid, forced, counts):
  """Each row's counts[row] best valid cells by a stable descending argsort and its inverse."""
  xp = np if isinstance(score, np.ndarray) else jnp
  score = xp.where(forced, xp.inf, xp.where(valid, score, -xp.inf))
  order = xp.argsort(-score, axis=-1, stable=True)
  rank = xp.argsort(order, axis=-1, stable=True)
  return (rank < counts[:, None]) & valid


def causal_probs(q, k):
  valid = layout.layout(q.shape[1], k.shape[1], 1).valid
  probs = jax.nn.softmax(jnp.where(valid, features.logits(q, k), -jnp.inf), axis=-1)
  return jnp.where(valid, probs, 0.0)


def h2o_scores(p, q, k, grid, counts, layer):
  del p, layer
  probs = causal_probs(q, k)
  accumulated = jnp.cumsum(probs, axis=2)
  accumulated = jnp.concatenate([jnp.zeros_like(accumulated[..., :1, :]), accumulated[..., :-1, :]], axis=2)
  recent = grid.distance < -(-counts // 2)[:, None]
  return jnp.where(recent & grid.valid, np.inf, accumulated)


def topk_token_scores(p, q, k, grid, counts, layer):
  del p, grid, counts, layer
  return features.logits(q, k)


def reformer_scores(p, q, k, grid, counts, layer):
  del counts
  heads, head_dim = q.shape[2], q.shape[3]
  rotations = policy.random_draw(jax.random.normal, p.seed, layer,
                                 (heads, p.n_rounds, head_dim, p.n_buckets // 2))
  q_buckets = reformer.lsh_buckets(q, rotations)
  k_buckets = reformer.lsh_buckets(features.per_query_head(k, heads), rotations)
  shared = sum((q_buckets[:, :, r, :, None] == k_buckets[:, :, r, None, :]).astype(jnp.float32)
               for r in range(p.n_rounds))
  return shared + grid.columns / k.shape[1]


def routing_scores(p, q, k, grid, counts, layer):
  del grid, counts
  highest = jax.lax.Precision.HIGHEST
  batch, _, heads, head_dim = q.shape
  q_unit, k_unit = features.unit(q), features.unit(features.per_query_head(k, heads))
  initial = features.unit(policy.random_draw(jax.random.normal, p.seed, layer,
                                             (heads, p.n_clusters, head_dim)))
  centroids = jnp.broadcast_to(initial, (batch, *initial.shape))
  points = jnp.concatenate([q_unit, k_unit], axis=1)
  for _ in range(p.n_iters):
    centroids = routing.lloyd_step(points, centroids)
  q_cluster = jnp.argmax(jnp.einsum("bthd,bhcd->bhtc", q_unit, centroids, precision=highest), axis=-1)
  k_cluster = jnp.argmax(jnp.einsum("bshd,bhcd->bhsc", k_unit, centroids, precision=highest), axis=-1)
  q_centroid = jnp.take_along_axis(centroids, q_cluster[..., None], axis=2)
  affinity = jnp.einsum("bhtd,bshd->bhts", q_centroid, k_unit, precision=highest)
  return affinity + 3.0 * (q_cluster[..., :, None] == k_cluster[..., None, :])


def topk_block_scores(p, q, k, grid, counts, layer):
  del grid, counts, layer
  return sparsity.block_sum(causal_probs(q, k), p.block_size)


SCORES = {"h2o": h2o_scores, "topk_token": topk_token_scores, "reformer": reformer_scores,
          "routing": routing_scores, "topk_block": topk_block_scores}


def select(p, q, k, block, layer):
  """`BaselinePolicy.select` before chunking: bool [batch, heads, rows, cols]."""
  grid = layout.layout(q.shape[1], k.shape[1], block)
  counts = budget.row_budgets(grid.valid.sum(axis=1), grid.diagonal.sum(axis=1),
                              budget.target_count(p.sparsity, grid.valid))
  keep = keep_top(SCORES[p.name](p, q, k, grid, counts, layer), grid.valid, grid.diagonal, counts)
  return jnp.broadcast_to(keep, (q.shape[0], q.shape[2], *grid.valid.shape))


def token_sparsity(mask):
  valid = layout.layout(*mask.shape[-2:], 1).valid
  return 1.0 - jnp.sum(mask & valid, axis=(-2, -1), dtype=jnp.float32) / valid.sum()


def block_sparsity(mask, block):
  q_len, kv_len = mask.shape[-2:]
  touched = sparsity.block_sum((mask & layout.layout(q_len, kv_len, 1).valid).astype(jnp.int32), block) > 0
  valid = layout.layout(q_len, kv_len, block).valid
  return 1.0 - jnp.sum(touched & valid, axis=(-2, -1), dtype=jnp.float32) / valid.sum()


def attend(p, q, k, v, layer=0):
  """A token-level policy's (out, sparsity) before chunking."""
  mask = select(p, q, k, 1, layer)
  return policy.masked_attention(q, k, v, mask), token_sparsity(mask)
