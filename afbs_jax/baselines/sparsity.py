"""What sparsity means for every baseline, and the mask conversions it is measured through.

Token sparsity = 1 − kept causal-valid (t, u) pairs / causal-valid pairs. Block sparsity = 1 −
causal-valid block_size × block_size tiles touched by any kept pair / causal-valid tiles; for a
block-level policy it equals 1 − `BlockSparseStats.density` of its kernel call. Both are per (batch,
head). A block-level baseline's target is a block sparsity, a token-level one's a token sparsity. A
target lies in [0, 1): a Python number (static: exact numpy budgets) or, for the baselines that allow it, a
jax f32 scalar (traced: one compiled program serves every target; `afbs_jax.baselines.policy`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.baselines.layout import layout, token_rows, token_valid


def check_sparsity(value: Any) -> float:
  """The target as a float; a ValueError unless it is a real number in [0, 1)."""
  number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
  if not (number and 0.0 <= float(value) < 1.0):  # NaN fails the range test too.
    raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of attention dropped); got "
                     f"{value!r}")
  return float(value)


def check_traced_sparsity(value: jax.Array) -> jax.Array:
  """A jax scalar target as f32 [], a pytree leaf that jit traces; a ValueError unless it is a real scalar
  in [0, 1) (a tracer's value cannot be checked, only its shape and dtype)."""
  if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
    raise ValueError(f"a traced sparsity must be a float scalar; got {value.dtype}{list(value.shape)}")
  value = value.astype(jnp.float32)
  try:
    check_sparsity(float(value))
  except jax.errors.ConcretizationTypeError:
    pass  # Built under a transform: checked where it was made concrete, if anywhere.
  return value


def block_sum(x: jax.Array, block: int) -> jax.Array:
  """Sums x: [..., T, S] over block × block tiles (partial last tiles padded with 0) -> [..., rows, cols]."""
  return block_tiles(x, block).sum(axis=(-3, -1))


def block_any(x: jax.Array, block: int) -> jax.Array:
  """Whether any of x: bool [..., T, S] is set in each block × block tile -> bool [..., rows, cols]."""
  return block_tiles(x, block).any(axis=(-3, -1))


def block_tiles(x: jax.Array, block: int) -> jax.Array:
  """x: [..., T, S] -> [..., rows, block, cols, block], partial last tiles padded with 0 (False)."""
  q_len, kv_len = x.shape[-2:]
  rows, cols = math.ceil(q_len / block), math.ceil(kv_len / block)
  pad = [(0, 0)] * (x.ndim - 2) + [(0, rows * block - q_len), (0, cols * block - kv_len)]
  return jnp.pad(x, pad).reshape(*x.shape[:-2], rows, block, cols, block)


def expand_blocks(block_mask: jax.Array, block: int, q_len: int, kv_len: int) -> jax.Array:
  """bool [..., rows, cols] -> bool [..., T, S]: every causal-valid pair of a kept tile."""
  tokens = jnp.repeat(jnp.repeat(block_mask, block, axis=-2), block, axis=-1)[..., :q_len, :kv_len]
  return tokens & token_valid(q_len, kv_len, jnp)


def token_sparsity(token_mask: jax.Array) -> jax.Array:
  """token_mask: bool [batch, heads, T, S] -> f32 [batch, heads]."""
  q_len, kv_len = token_mask.shape[-2:]
  kept = jnp.sum(token_mask & token_valid(q_len, kv_len, jnp), axis=(-2, -1), dtype=jnp.float32)
  return 1.0 - kept / token_rows(q_len, kv_len)[0].sum()


def block_sparsity(token_mask: jax.Array, block: int) -> jax.Array:
  """token_mask: bool [batch, heads, T, S] -> f32 [batch, heads], counted over block × block tiles."""
  q_len, kv_len = token_mask.shape[-2:]
  touched = block_any(token_mask & token_valid(q_len, kv_len, jnp), block)
  valid = layout(q_len, kv_len, block).valid
  return 1.0 - jnp.sum(touched & valid, axis=(-2, -1), dtype=jnp.float32) / valid.sum()
