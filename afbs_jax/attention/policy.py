"""The attention-policy seam: the one call through which every model layer computes self-attention.

A policy is a callable `policy(q, k, v, *, layer, q_positions=None) -> out` with q: [batch, T, heads,
head_dim] (post-RoPE), k, v: [batch, S, kv_heads, head_dim] and out: [batch, T, heads, head_dim].
`q_positions` (int [T]) gives the queries' absolute positions when they are not the last T of S keys: a
decode step against a fixed-size KV cache, where key j (position j) is visible to query t iff j <=
q_positions[t]. None is the prefill case, bottom-right aligned (query t sits at position S − T + t).
Callers pass `q_positions` only when it is not None, so a plain `(q, k, v, *, layer)` callable is a
valid prefill policy. Policies are JAX pytrees: per-head parameters are array leaves (new values reuse the
compiled forward), everything else is static (changing it recompiles).

Precision policy (every policy and kernel follows it): q, k, v enter in their own dtype (bf16 for real
checkpoints); q·k accumulates in f32, the softmax (max, exp, sum) runs in f32, P·V accumulates in f32,
and the output is rounded to q.dtype once, at the end. The jnp paths, `dense.dense_attention` (dense off
cuDNN) and `kernels.block_sparse_reference` (`backend="auto"` on CPU), also keep P in f32, so with every
block kept a sparse policy reproduces dense attention up to the order of f32 sums: in bf16, a one-ulp
rounding flip in about 1e-4 of the elements. The fused GPU/TPU kernels, cuDNN (dense), Triton and Mosaic,
round P to the input dtype for the P·V matmul, as FlashAttention does; their accumulation is f32 as well.
A bf16 model's residual stream rounds in every layer and amplifies any such flip: 30 layers of SmolLM2
turn it into logit differences of ~0.1 (mean), as large as swapping two f32 summation orders of dense
attention itself. In f32 the all-kept sparse and the dense model agree to ~1e-4 (tests/model/
test_precision_policy.py).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp


class Policy(Protocol):
  """What a model layer calls; see the module docstring."""

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int,
               q_positions: jax.Array | None = None) -> jax.Array:
    ...


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """Raises a ValueError unless q, k, v have the policy-seam shapes (GQA: heads % kv_heads == 0)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape=}, {k.shape=}, {v.shape=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape=}, {v.shape=}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must agree on batch and head_dim; got {q.shape=}, {k.shape=}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def check_q_positions(q_positions: Any, q_len: int) -> jax.Array:
  """Validates query positions: int [T]; returns them as an int32 array."""
  positions = jnp.asarray(q_positions)
  if positions.shape != (q_len,) or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"q_positions must be an int array of shape [T]=({q_len},); got "
                     f"{positions.dtype}{list(positions.shape)}")
  return positions.astype(jnp.int32)


def per_head_table(name: str, value: Any) -> jax.Array:
  """A [layers, heads] parameter table as f32."""
  table = jnp.asarray(value, dtype=jnp.float32)
  if table.ndim != 2:
    raise ValueError(f"{name} must be a [layers, heads] array; got shape {table.shape}")
  return table
