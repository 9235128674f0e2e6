"""Decode-phase sparse attention as a policy: which cached key blocks each decode step reads.

A decode policy is what a model's cached decode step calls instead of dense attention against the whole
cache: `policy.decode(q, k_cache, v_cache, lengths, *, layer) -> out`, with q: [batch, T, heads,
head_dim] the newest T tokens (their K/V already written), caches [batch, max_len, kv_heads, head_dim]
and lengths int [batch] the filled slots. `DecodeSparseAttention` keeps, per (batch, head), the key
blocks chosen by SpargeAttn's τ top-CDF rule or a fixed top-k budget over mean-pooled cache blocks, plus
the blocks holding the chunk and (by default) block 0; `kernels.decode_sparse` documents the rule. Like
the prefill policies it is a pytree: the τ / k tables are array leaves (new values reuse the compiled
decode loop), the block size, sink and backend are static.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_config import check_block_size
from kernels.decode_sparse import DECODE_BACKENDS, decode_sparse_attention


class DecodePolicy(Protocol):
  """What a model's cached decode step calls; see the module docstring."""

  def decode(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
             layer: int) -> jax.Array:
    ...


def _table(name: str, value: Any, dtype: Any) -> jax.Array:
  """A scalar, [heads] or [layers, heads] table as an array of `dtype`."""
  table = np.asarray(value)
  if table.ndim > 2:
    raise ValueError(f"{name} must be a scalar, [heads] or [layers, heads]; got shape {table.shape}")
  if dtype == jnp.int32 and not np.issubdtype(table.dtype, np.integer):
    raise ValueError(f"{name} must be integer (kept blocks per head); got dtype {table.dtype}")
  return jnp.asarray(table, dtype)


@jax.tree_util.register_pytree_node_class
class DecodeSparseAttention:
  """Block-sparse decode steps with per-head τ (top-CDF mass) or top-k (blocks besides the forced ones).

  Args:
    tau: a scalar, [heads] or [layers, heads] table in (0, 1]; 1 keeps every block (dense decode).
    top_k: the same shapes, integers >= 1. Exactly one of tau and top_k.
    block_size: cache slots per block, a power of two >= 16 dividing the cache's max_len.
    sink: always keep block 0 (the blocks holding the chunk are always kept).
    backend: one of `kernels.decode_sparse.DECODE_BACKENDS` ("auto": Triton on GPU, jnp elsewhere).
  """

  def __init__(self, *, tau: Any = None, top_k: Any = None, block_size: int = 64, sink: bool = True,
               backend: str = "auto"):
    if (tau is None) == (top_k is None):
      raise ValueError("give exactly one of tau and top_k")
    if backend not in DECODE_BACKENDS:
      raise ValueError(f"backend must be one of {DECODE_BACKENDS}; got {backend!r}")
    self.tau = None if tau is None else _table("tau", tau, jnp.float32)
    self.top_k = None if top_k is None else _table("top_k", top_k, jnp.int32)
    self.block_size = check_block_size("block_size", block_size)
    self.sink = bool(sink)
    self.backend = backend

  def tree_flatten(self):
    return (self.tau, self.top_k), (self.block_size, self.sink, self.backend)

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    policy = object.__new__(cls)
    policy.tau, policy.top_k = children
    policy.block_size, policy.sink, policy.backend = aux_data
    return policy

  def __repr__(self) -> str:
    rule = "tau" if self.tau is not None else "top_k"
    return (f"DecodeSparseAttention({rule}{list(getattr(self, rule).shape)}, block_size={self.block_size}, "
            f"sink={self.sink}, backend={self.backend!r})")

  @staticmethod
  def _for_layer(table: jax.Array | None, layer: int) -> jax.Array | None:
    return table[layer] if table is not None and table.ndim == 2 else table

  def decode(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
             layer: int) -> jax.Array:
    """q: [batch, T, heads, head_dim], caches [batch, max_len, kv_heads, head_dim], lengths int [batch]
    (the chunk included) -> [batch, T, heads, head_dim] in q.dtype."""
    return decode_sparse_attention(q, k_cache, v_cache, lengths, tau=self._for_layer(self.tau, layer),
                                   top_k=self._for_layer(self.top_k, layer), block_size=self.block_size,
                                   sink=self.sink, backend=self.backend)

  def decode_with_stats(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                        layer: int):
    """`decode` plus `kernels.decode_sparse.DecodeSparseStats` (kept blocks, decode sparsity)."""
    return decode_sparse_attention(q, k_cache, v_cache, lengths, tau=self._for_layer(self.tau, layer),
                                   top_k=self._for_layer(self.top_k, layer), block_size=self.block_size,
                                   sink=self.sink, backend=self.backend, return_stats=True)
