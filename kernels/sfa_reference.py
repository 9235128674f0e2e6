"""Sparse Feature Attention (SFA) in plain jnp: the semantics every SFA kernel must match.

SFA ("Scaling Attention via Feature Sparsity", seed paper 004) gives each query and each key a k-sparse
code of its own features: query t keeps its `k_q` features of largest magnitude, key u its `k_k`, the
others become 0, and attention is exact softmax attention over the logits sm_scale · sparse(q_t) ·
sparse(k_u); V stays dense. Selection is `lax.top_k` of |x| along head_dim, ties going to the lower
feature index, so every backend selects exactly the same features (they all call `top_k_mask` or
`top_k_codes`). Keys are sparsified per kv head, before GQA sharing. Masking is token-level: element
(t, u) takes part iff, when causal, u ≤ t + S − T (bottom-right aligned, as everywhere in `kernels/`) and,
with a block mask, block (t // block_q, u // block_k) is kept; a row with no element taking part outputs
exactly 0. Logits, softmax and P·V accumulate in f32; the output has q's dtype.

Gradients are straight-through to the kept features: the selection is a constant for differentiation,
sparse(x) = x ⊙ stop_gradient(M(x)) with M(x) the bool top-k mask, so ∂L/∂x = M(x) ⊙ ∂L/∂sparse(x). Kept
features receive the gradient of attention over the sparsified q and k; dropped features receive exactly
0. Wherever |x| has no tie at the k-th place the selection is locally constant, so this is the true
derivative there (the finite-difference test checks it). Non-finite q or k are outside the contract (the
rank of a NaN magnitude is unspecified).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from kernels.block_config import check_block_size
# The block-sparse front door's checks (4-d, floating, one dtype, GQA grouping, sm_scale, mask) apply as is.
from kernels.block_sparse import check_mask, check_qkv, check_sm_scale

_HIGHEST = lax.Precision.HIGHEST


def top_k_codes(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k-sparse code of each row of x: its k features of largest |x| (ties: the lower index).

  Args:
    x: [..., head_dim].
    k: static, 1 <= k <= head_dim.

  Returns:
    indices: int32 [..., k], in order of decreasing magnitude; values: [..., k] in x.dtype, the features
    at `indices` (differentiable: the gradient reaches the kept features only).
  """
  _, indices = lax.top_k(lax.stop_gradient(jnp.abs(x)), k)
  return indices, jnp.take_along_axis(x, indices, axis=-1)


def top_k_mask(x: jax.Array, k: int) -> jax.Array:
  """bool [..., head_dim]: the features `top_k_codes(x, k)` keeps."""
  indices, _ = top_k_codes(x, k)
  return jnp.put_along_axis(jnp.zeros(x.shape, jnp.bool_), indices, True, axis=-1, inplace=False)


def sparsify(x: jax.Array, k: int) -> jax.Array:
  """x with all but each row's top-k features (by magnitude) zeroed; straight-through gradient."""
  return x * lax.stop_gradient(top_k_mask(x, k)).astype(x.dtype)


def expand_block_mask(block_mask: jax.Array, q_len: int, kv_len: int, block_q: int,
                      block_k: int) -> jax.Array:
  """bool [batch, heads, n_q_blocks, n_k_blocks] -> bool [batch, heads, T, S], element (t, u) = block."""
  rows = np.arange(q_len) // block_q
  cols = np.arange(kv_len) // block_k
  return jnp.asarray(block_mask, jnp.bool_)[:, :, rows][:, :, :, cols]


def element_mask(q_len: int, kv_len: int, *, causal: bool) -> np.ndarray:
  """bool [T, S]: element (t, u) takes part; causal is bottom-right aligned (u <= t + S - T)."""
  if not causal:
    return np.ones((q_len, kv_len), bool)
  return np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + (kv_len - q_len)


# ----------------------------------------------------------------------------------------------------
# Checks shared with the front door (`kernels.sfa`): shapes, dtypes and static options, before tracing.


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_sfa_inputs(q: Any, k: Any, v: Any, *, k_q: Any, k_k: Any, causal: Any, sm_scale: Any,
                     block_mask: Any, block_q: int, block_k: int) -> None:
  """Raises ValueError naming the first bad argument of an SFA call."""
  check_qkv(q, k, v)
  check_sm_scale(sm_scale)
  head_dim = q.shape[-1]
  for name, value in (("k_q", k_q), ("k_k", k_k)):
    if not _is_int(value) or not 1 <= value <= head_dim:
      raise ValueError(f"{name} must be an int in [1, head_dim={head_dim}] (features kept per "
                       f"{'query' if name == 'k_q' else 'key'}); got {value!r}.")
  if not isinstance(causal, bool):
    raise ValueError(f"causal must be a bool; got {causal!r}.")
  check_block_size("block_q", block_q)
  check_block_size("block_k", block_k)
  if block_mask is not None:
    shape = (q.shape[0], q.shape[2], -(-q.shape[1] // block_q), -(-k.shape[1] // block_k))
    check_mask(block_mask, shape)


def default_scale(head_dim: int, sm_scale: float | None) -> float:
  """1/sqrt(head_dim) of the full head_dim (the sparse codes live in the same space as dense q, k)."""
  return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


# ----------------------------------------------------------------------------------------------------
# The reference.


@functools.partial(jax.jit, static_argnames=("k_q", "k_k", "causal", "sm_scale", "block_q", "block_k"))
def _reference(q, k, v, block_mask, *, k_q: int, k_k: int, causal: bool, sm_scale: float, block_q: int,
               block_k: int):
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  q_s = sparsify(q, k_q).astype(jnp.float32).reshape(batch, q_len, kv_heads, group, head_dim)
  k_s = sparsify(k, k_k).astype(jnp.float32)
  # Query head h = kv_head * group + g reads kv head h // group.
  logits = sm_scale * jnp.einsum("btkgd,bskd->bkgts", q_s, k_s, precision=_HIGHEST)
  allowed = jnp.asarray(element_mask(q_len, kv_len, causal=causal))
  if block_mask is not None:
    allowed = allowed & expand_block_mask(block_mask, q_len, kv_len, block_q, block_k).reshape(
        batch, kv_heads, group, q_len, kv_len)
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = logits.max(axis=-1, keepdims=True)
  # A row with nothing allowed keeps max -inf; shift it by 0 so that its weights are 0, not NaN.
  weights = jnp.exp(logits - jnp.where(row_max == -jnp.inf, 0.0, row_max))
  denominator = weights.sum(axis=-1, keepdims=True)
  probs = weights / jnp.where(denominator == 0, 1.0, denominator)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32), precision=_HIGHEST)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def sfa_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, k_q: int, k_k: int,
                            causal: bool = True, sm_scale: float | None = None,
                            block_mask: jax.Array | None = None, block_q: int = 64,
                            block_k: int = 64) -> jax.Array:
  """Sparse Feature Attention, materialising the dense [T, S] logits (the definition; module docstring).

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0, one
      floating dtype.
    k_q, k_k: features kept per query and per key, each in [1, head_dim]; head_dim keeps all (dense).
    causal: bottom-right aligned causal masking (u <= t + S - T).
    sm_scale: logit scale, 1/sqrt(head_dim) when None.
    block_mask: None, or bool [batch, heads, ceil(T / block_q), ceil(S / block_k)]: attention runs inside
      kept blocks only (may be traced).
    block_q, block_k: the block mask's tile sizes (powers of two >= 16; unused without a block mask).

  Returns:
    [batch, T, heads, head_dim] in q.dtype; rows with nothing allowed are 0. Differentiable in q, k, v,
    straight-through to the kept features.
  """
  check_sfa_inputs(q, k, v, k_q=k_q, k_k=k_k, causal=causal, sm_scale=sm_scale, block_mask=block_mask,
                   block_q=block_q, block_k=block_k)
  return _reference(q, k, v, block_mask, k_q=int(k_q), k_k=int(k_k), causal=causal,
                    sm_scale=default_scale(q.shape[-1], sm_scale), block_q=block_q, block_k=block_k)
