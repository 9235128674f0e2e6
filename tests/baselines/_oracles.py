"""Independent numpy oracles for the baseline tests: inputs, geometry, budgets, patterns and attention.

Written as plain loops over tokens, rows and blocks in float64, sharing no code with
`afbs_jax.baselines` beyond the rules its docstrings state.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def random_qkv(seed: int = 0, *, batch: int = 2, q_len: int = 128, kv_len: int | None = None, heads: int = 4,
               kv_heads: int = 2, head_dim: int = 16) -> tuple[jnp.ndarray, ...]:
  """Gaussian f32 q: [batch, T, heads, D]; k, v: [batch, S, kv_heads, D]."""
  rng = np.random.default_rng(seed)
  kv_len = q_len if kv_len is None else kv_len
  q = rng.standard_normal((batch, q_len, heads, head_dim))
  k, v = (rng.standard_normal((batch, kv_len, kv_heads, head_dim)) for _ in range(2))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def causal(q_len: int, kv_len: int) -> np.ndarray:
  """bool [T, S]: query t sees key u iff u <= t + S - T."""
  return np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + kv_len - q_len


def geometry(q_len: int, kv_len: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(valid, distance, diagonal) over block tiles, by looking at every token pair.

  valid: a tile holds a visible pair; distance: (last valid tile of the row) - column; diagonal: a tile
  holds some query's own position (t, t + S - T).
  """
  visible = causal(q_len, kv_len)
  rows, cols = math.ceil(q_len / block), math.ceil(kv_len / block)
  valid = np.zeros((rows, cols), bool)
  diagonal = np.zeros((rows, cols), bool)
  for i in range(rows):
    for j in range(cols):
      tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
      valid[i, j] = visible[tile].any()
  for t in range(q_len):
    if t + kv_len - q_len >= 0:
      diagonal[t // block, (t + kv_len - q_len) // block] = True
  last = np.array([np.flatnonzero(row).max() if row.any() else -1 for row in valid])
  return valid, last[:, None] - np.arange(cols)[None, :], diagonal


def budgets(available: np.ndarray, forced: np.ndarray, sparsity: float) -> np.ndarray:
  """Per-row kept counts: round((1 - sparsity) * Σ available) spread level by level, the last partial
  level's extra cells to the last rows that can still grow."""
  total = int(np.floor((1 - sparsity) * available.sum() + 0.5))
  total = min(max(total, int(forced.sum())), int(available.sum()))
  fill = lambda level: np.clip(level, forced, available)
  level = 0
  while level < available.max() and fill(level + 1).sum() <= total:
    level += 1
  counts = fill(level)
  growing = [r for r in range(len(counts)) if fill(level + 1)[r] > counts[r]]
  for r in growing[::-1][:total - counts.sum()]:
    counts[r] += 1
  return counts


def ranked_pattern(order_key, q_len: int, kv_len: int, block: int, sparsity: float) -> np.ndarray:
  """bool [rows, cols]: each row keeps its diagonal tiles, then its valid tiles in `order_key(d, j)` order."""
  valid, distance, diagonal = geometry(q_len, kv_len, block)
  counts = budgets(valid.sum(1), diagonal.sum(1), sparsity)
  mask = np.zeros_like(valid)
  for i, count in enumerate(counts):
    cells = sorted(np.flatnonzero(valid[i]), key=lambda j: (not diagonal[i, j], order_key(distance[i, j], j)))
    mask[i, cells[:count]] = True
  return mask


def strided_order(n_k: int):
  """Sparse Transformer order key: d = 0, l, 1, 2l, 2, 3l, ... (l local, then every l-th), then the rest."""
  stride = max(1, round(math.sqrt(n_k)))
  local, strided = list(range(stride)), list(range(stride, n_k, stride))
  order = [d for pair in zip(local + [None] * n_k, strided + [None] * n_k) for d in pair if d is not None]
  order += [d for d in range(n_k) if d not in order]
  return lambda d, j: order.index(d)


PATTERNS = {
    "window": lambda n_k: lambda d, j: d,
    "streamingllm": lambda n_k: lambda d, j: (j != 0, d),
    "longformer": lambda n_k: lambda d, j: (min(d, j), d),   # window_per_global = 1
    "sparse_transformer": strided_order,
}


def logits(q, k) -> np.ndarray:
  """float64 [batch, heads, T, S], q·k / sqrt(D) with GQA by repetition."""
  q, k = (np.asarray(x, np.float64) for x in (q, k))
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  return np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])


def softmax_probs(q, k, mask: np.ndarray) -> np.ndarray:
  """float64 softmax of the logits over `mask` ([..., T, S] broadcastable); empty rows are 0."""
  scores = np.where(mask, logits(q, k), -np.inf)
  row_max = scores.max(axis=-1, keepdims=True)
  weights = np.where(mask, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  total = weights.sum(axis=-1, keepdims=True)
  return np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)


def masked_attention(q, k, v, mask: np.ndarray) -> np.ndarray:
  """float64 [batch, T, heads, D]: softmax attention over the kept keys (mask: [batch, heads, T, S])."""
  v = np.asarray(v, np.float64)
  v = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
  return np.einsum("bhts,bshd->bthd", softmax_probs(q, k, mask), v)
