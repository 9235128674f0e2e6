"""Independent numpy oracles for the kernel tests: random inputs, dense attention, block-skip attention.

These are written as plainly as possible (float64 numpy, explicit loops over rows and blocks) so that the
jnp reference and the Pallas kernels can be checked against something that shares none of their code.
The Pallas kernel tests import them too.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def random_qkv(seed: int, *, batch: int = 1, q_len: int, kv_len: int, heads: int, kv_heads: int,
               head_dim: int, dtype=jnp.float32, scale: float = 1.0,
               sink: float = 0.0) -> tuple[jnp.ndarray, ...]:
  """Gaussian q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim] in `dtype`.

  `scale` multiplies q and k. `sink` > 0 adds `sink` times one shared unit direction to every query and
  to the first 4 keys, an attention sink like those of trained LLMs: every row's max then sits in key
  block 0 and later blocks fall far below it, which is what makes λ skip blocks.
  """
  rng = np.random.default_rng(seed)
  q = scale * rng.standard_normal((batch, q_len, heads, head_dim))
  k = scale * rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  v = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  direction = np.zeros(head_dim)
  direction[0] = sink
  q += direction
  k[:, :4] += direction
  return tuple(jnp.asarray(x, dtype=dtype) for x in (q, k, v))


def unmasked_elements(q_len: int, kv_len: int, causal: bool) -> np.ndarray:
  """bool [q_len, kv_len]: element (t, u) takes part; causal is bottom-right aligned (u <= t + S - T)."""
  t = np.arange(q_len)[:, None]
  u = np.arange(kv_len)[None, :]
  if not causal:
    return np.ones((q_len, kv_len), dtype=bool)
  return u <= t + kv_len - q_len


def causal_valid_blocks(q_len: int, kv_len: int, causal: bool, block_q: int, block_k: int) -> np.ndarray:
  """bool [n_q_blocks, n_k_blocks]: a block is valid when any of its elements is unmasked."""
  elements = unmasked_elements(q_len, kv_len, causal)
  n_q, n_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
  valid = np.zeros((n_q, n_k), dtype=bool)
  for i in range(n_q):
    for j in range(n_k):
      valid[i, j] = elements[i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k].any()
  return valid


def _as_f64(*arrays) -> list[np.ndarray]:
  return [np.asarray(jnp.asarray(x, jnp.float32), dtype=np.float64) for x in arrays]


def dense_attention(q, k, v, *, causal: bool, sm_scale: float | None = None) -> np.ndarray:
  """Plain softmax attention in float64; rows with no unmasked key output 0.

  q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim] -> [batch, T, heads, head_dim].
  """
  q, k, v = _as_f64(q, k, v)
  heads, kv_heads = q.shape[2], k.shape[2]
  k = np.repeat(k, heads // kv_heads, axis=2)
  v = np.repeat(v, heads // kv_heads, axis=2)
  scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
  logits = scale * np.einsum("bthd,bshd->bhts", q, k)
  allowed = unmasked_elements(q.shape[1], k.shape[1], causal)
  logits = np.where(allowed, logits, -np.inf)
  row_max = logits.max(axis=-1, keepdims=True)
  has_any = np.isfinite(row_max)
  weights = np.where(allowed, np.exp(logits - np.where(has_any, row_max, 0.0)), 0.0)
  denom = weights.sum(axis=-1, keepdims=True)
  probs = np.where(has_any, weights / np.where(has_any, denom, 1.0), 0.0)
  return np.einsum("bhts,bshd->bthd", probs, v)


def block_skip_attention(q, k, v, mask, lam, *, causal: bool, block_q: int, block_k: int,
                         sm_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Brute-force block-sparse attention with the λ P·V skip, one (batch, head, q block) at a time.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim].
    mask: bool [batch, heads, n_q_blocks, n_k_blocks], kept key blocks per q block.
    lam: None, a scalar or [heads]; natural-log units, -inf (or None) never skips.

  Returns:
    out: float64 [batch, T, heads, head_dim]; pv_skipped: int [batch, heads, n_q_blocks].
  """
  q, k, v = _as_f64(q, k, v)
  mask = np.asarray(mask, dtype=bool)
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  lam = np.broadcast_to(np.asarray(-np.inf if lam is None else lam, np.float64), (heads,))
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  elements = unmasked_elements(q_len, kv_len, causal)
  out = np.zeros_like(q)
  pv_skipped = np.zeros(mask.shape[:3], dtype=np.int64)
  for b in range(batch):
    for h in range(heads):
      for i in range(mask.shape[2]):
        rows = np.arange(i * block_q, min((i + 1) * block_q, q_len))
        m = np.full(len(rows), -np.inf)
        l = np.zeros(len(rows))
        acc = np.zeros((len(rows), head_dim))
        for j in np.flatnonzero(mask[b, h, i]):
          cols = np.arange(j * block_k, min((j + 1) * block_k, kv_len))
          unmasked = elements[np.ix_(rows, cols)]
          s = scale * q[b, rows, h] @ k[b, cols, h // group].T
          s = np.where(unmasked, s, -np.inf)
          tile_max = s.max(axis=1)
          takes_part = np.isfinite(tile_max)
          if not takes_part.any():
            continue
          gaps = [np.inf if m[r] == -np.inf else tile_max[r] - m[r] for r in np.flatnonzero(takes_part)]
          if max(gaps) < lam[h]:
            pv_skipped[b, h, i] += 1
            continue
          m_new = np.maximum(m, tile_max)
          alpha = np.where(m == -np.inf, 0.0, np.exp(m - np.where(np.isfinite(m_new), m_new, 0.0)))
          p = np.where(unmasked, np.exp(s - np.where(np.isfinite(m_new), m_new, 0.0)[:, None]), 0.0)
          l = alpha * l + p.sum(axis=1)
          acc = alpha[:, None] * acc + p @ v[b, cols, h // group]
          m = m_new
        out[b, rows, h] = np.where(l[:, None] > 0, acc / np.where(l > 0, l, 1.0)[:, None], 0.0)
  return out, pv_skipped


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max(max |expected|, tiny): the bf16 tolerance measure."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))
