"""Exact counting: how many cells a target sparsity keeps, how they spread over rows, and which ones.

A baseline never turns its target into a window width or a k by a formula (those drift by a whole
diagonal at short lengths); it keeps exactly round((1 − sparsity) · valid cells), spread as evenly over
the query rows as their causal lengths allow, and ranks each row's cells by its own score.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def target_count(sparsity: float, valid: np.ndarray) -> int:
  """round((1 − sparsity) · valid cells), halves rounding up; `valid` is the bool [rows, cols] grid or its
  per-row counts."""
  return int(np.floor((1.0 - sparsity) * int(valid.sum()) + 0.5))


def row_budgets(available: np.ndarray, forced: np.ndarray, total: int) -> np.ndarray:
  """Per-row kept counts that sum to `total` (clipped to [Σ forced, Σ available]).

  Every row gets clip(level, forced, available) for the largest level whose sum fits; the rows that level
  + 1 would still grow take the remainder, one each, last rows first (they have the most keys to choose
  from). So unsaturated rows differ by at most one.

  Args:
    available: int [rows], valid cells per row.
    forced: int [rows], cells a row must keep (its diagonal), <= available.
    total: the kept count to reach.

  Returns:
    int [rows].
  """
  total = int(np.clip(total, forced.sum(), available.sum()))
  fill = lambda level: int(np.clip(level, forced, available).sum())
  low, high = 0, int(available.max(initial=0))
  while low < high:  # The largest level with fill(level) <= total; fill(0) = Σ forced always fits.
    middle = (low + high + 1) // 2
    low, high = (middle, high) if fill(middle) <= total else (low, middle - 1)
  counts = np.clip(low, forced, available)
  growing = np.flatnonzero(np.clip(low + 1, forced, available) > counts)
  remainder = total - int(counts.sum())
  counts[growing[len(growing) - remainder:]] += 1
  return counts


def keep_top(score: np.ndarray | jax.Array, valid: np.ndarray, forced: np.ndarray,
             counts: np.ndarray) -> np.ndarray | jax.Array:
  """In each row, the `counts[row]` valid cells with the highest score, forced cells first.

  Ties go to the lower column (a stable sort), so the count is exact whatever the scores. Static numpy
  scores give a numpy mask (a compile-time constant); jax scores a jax mask.

  The mask is what a stable descending argsort would rank below `counts[row]`, found with one sort and
  no ranks: the cut is the row's counts-th largest score v; cells above v are kept, and of the cells
  equal to v the first counts − #(above v) by column. A cell above v ranks below #(above v) <= counts − 1,
  a cell below v at or after #(>= v) >= counts, and a tied cell at #(above v) + #(tied at lower columns).
  Scores are compared as integers in the sort's total order (−0 equal to 0, NaN after −inf), so this
  holds for every value.

  Args:
    score: [..., rows, cols], any real dtype, higher kept first.
    valid, forced: bool [rows, cols].
    counts: int [rows], at most the valid cells of each row.

  Returns:
    bool [..., rows, cols].
  """
  xp = np if isinstance(score, np.ndarray) else jnp
  key = order_key(xp.where(forced, xp.inf, xp.where(valid, score, -xp.inf)))
  cols = key.shape[-1]
  counts = xp.asarray(counts)[:, None]                                  # [rows, 1]
  at = xp.broadcast_to(xp.clip(cols - counts, 0, cols - 1), (*key.shape[:-1], 1))
  cut = xp.take_along_axis(xp.sort(key, axis=-1), at, axis=-1)         # The counts-th largest; any if 0.
  above, tied = key > cut, key == cut
  room = counts - above.sum(axis=-1, keepdims=True)                    # 0 when counts is 0: none kept.
  return (above | (tied & (xp.cumsum(tied, axis=-1) <= room))) & valid


def order_key(score: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """Integers ordered as a sort orders `score` (float): −0 equal to 0 and NaN below everything (a stable
  argsort of −score puts NaN last); same shape, int64 for float64 and int32 otherwise."""
  xp = np if isinstance(score, np.ndarray) else jnp
  wide = score.dtype == np.float64
  score = xp.where(score == 0, 0, score.astype(np.float64 if wide else np.float32))
  int_type = np.int64 if wide else np.int32
  bits = score.view(int_type) if xp is np else jax.lax.bitcast_convert_type(score, int_type)
  bits = xp.where(bits < 0, bits ^ np.iinfo(int_type).max, bits)  # Negative floats: larger magnitude lower.
  return xp.where(xp.isnan(score), np.iinfo(int_type).min, bits)
