"""What the data-dependent baselines look at: the true attention logits and probabilities, unit q and k.

All in f32 with bottom-right causal masking and GQA by grouping (query head h reads kv head
h // (heads // kv_heads)); the oracles and H2O rank on these, the hashing and clustering baselines on
the unit vectors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from afbs_jax.baselines.layout import token_valid

_HIGHEST = jax.lax.Precision.HIGHEST


def logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """q·k / sqrt(head_dim) in f32.

  q: [batch, T, heads, D]; k: [batch, S, kv_heads, D] -> [batch, heads, T, S].
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  grouped = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  # Heads ahead of positions in both operands: the product then comes out in [batch, heads, T, S] order.
  # From the [batch, T, heads, D] layouts XLA's CPU dot wrote [kv_heads, S, T · group] and transposed
  # that, which took longer than the product itself (the same values either way).
  grouped, keys = jnp.moveaxis(grouped, 1, 3), jnp.moveaxis(k.astype(jnp.float32), 1, 2)
  scores = jnp.einsum("bkgtd,bksd->bkgts", grouped, keys, precision=_HIGHEST)
  return scores.reshape(batch, heads, q_len, k.shape[1]) / math.sqrt(head_dim)


def causal_probs(q: jax.Array, k: jax.Array) -> jax.Array:
  """The true causal attention probabilities, f32 [batch, heads, T, S] (rows with no visible key are 0)."""
  return masked_probs(q, k, token_valid(q.shape[1], k.shape[1], jnp))


def masked_probs(q: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
  """Softmax of the logits over the `valid` keys (bool [T, S]), f32 [batch, heads, T, S]; rows with none
  are 0. With a chunk's rows and valid (`afbs_jax.baselines.chunks`), that chunk's rows of `causal_probs`."""
  probs = jax.nn.softmax(jnp.where(valid, logits(q, k), -jnp.inf), axis=-1)
  return jnp.where(valid, probs, 0.0)


def unit(x: jax.Array) -> jax.Array:
  """x / ||x|| over the last axis in f32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.where(norm > 0, norm, 1.0)


def per_query_head(k: jax.Array, heads: int) -> jax.Array:
  """k: [batch, S, kv_heads, D] -> [batch, S, heads, D], the kv head each query head reads.

  Only for per-head transforms of k (hash rotations, centroids): repeating costs one k-sized copy.
  """
  return jnp.repeat(k, heads // k.shape[2], axis=2)
