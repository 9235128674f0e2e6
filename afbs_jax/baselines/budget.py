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
  """round((1 − sparsity) · valid cells), halves rounding up."""
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

  Args:
    score: [..., rows, cols], any real dtype, higher kept first.
    valid, forced: bool [rows, cols].
    counts: int [rows], at most the valid cells of each row.

  Returns:
    bool [..., rows, cols].
  """
  xp = np if isinstance(score, np.ndarray) else jnp
  score = xp.where(forced, xp.inf, xp.where(valid, score, -xp.inf))
  order = xp.argsort(-score, axis=-1, stable=True)
  rank = xp.argsort(order, axis=-1, stable=True)  # The inverse permutation: each cell's place in its row.
  return (rank < counts[:, None]) & valid
