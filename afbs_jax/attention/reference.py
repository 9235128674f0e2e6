"""Exact attention and the error against it: what every tuner, evaluator and drift monitor measures with.

`dense_reference` is exact causal attention in f32 (the ground truth a sparse method's output is scored
against); `relative_l1_per_head` is the paper's error, Σ|o − o_ref| / Σ|o_ref| per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def dense_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Exact causal attention in f32, one kv-head group at a time to bound the logits' memory.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, T, kv_heads, head_dim].

  Returns:
    f32 [batch, T, heads, head_dim].
  """
  heads, kv_heads = q.shape[2], k.shape[2]
  group = heads // kv_heads
  outputs = []
  for kv_head in range(kv_heads):
    q_group = q[:, :, kv_head * group:(kv_head + 1) * group].astype(jnp.float32)
    k_head = k[:, :, kv_head:kv_head + 1].astype(jnp.float32)
    v_head = v[:, :, kv_head:kv_head + 1].astype(jnp.float32)
    outputs.append(jax.nn.dot_product_attention(q_group, k_head, v_head, is_causal=True,
                                                implementation="xla"))
  return jnp.concatenate(outputs, axis=2)


def relative_l1_per_head(out: jax.Array, reference: jax.Array) -> jax.Array:
  """Σ|out − reference| / Σ|reference| per head, over batch, tokens and head_dim.

  Args:
    out, reference: [batch, seq, heads, head_dim] (any float dtype; computed in f32).

  Returns:
    f32 [heads]. Traceable, so it runs inside a caller's jit.
  """
  if out.shape != reference.shape or out.ndim != 4:
    raise ValueError("out and reference must both be [batch, seq, heads, head_dim]; got "
                     f"{out.shape} and {reference.shape}")
  out, reference = out.astype(jnp.float32), reference.astype(jnp.float32)
  numerator = jnp.sum(jnp.abs(out - reference), axis=(0, 1, 3))
  denominator = jnp.sum(jnp.abs(reference), axis=(0, 1, 3))
  return numerator / jnp.maximum(denominator, jnp.finfo(jnp.float32).tiny)
