"""Exact counting: how many cells a target sparsity keeps, how they spread over rows, and which ones.

A baseline never turns its target into a window width or a k by a formula (those drift by a whole
diagonal at short lengths); it keeps exactly round((1 − sparsity) · valid cells), spread as evenly over
the query rows as their causal lengths allow, and ranks each row's cells by its own score. A traced
target (f32 []) gets the same counts in jnp, so one compiled program serves every target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def target_count(sparsity: float | jax.Array, valid: np.ndarray) -> int | jax.Array:
  """round((1 − sparsity) · valid cells), halves rounding up; `valid` is the bool [rows, cols] grid or its
  per-row counts.

  A traced sparsity (f32 []) gives an int32 [] equal to the Python float's count at the same value: the
  float32 values at or below `count_thresholds` are exactly those whose float64 count reaches each k.
  """
  if isinstance(sparsity, jax.Array):
    return jnp.sum(sparsity <= count_thresholds(int(valid.sum())), dtype=jnp.int32)
  return int(np.floor((1.0 - sparsity) * int(valid.sum()) + 0.5))


@functools.lru_cache(maxsize=64)
def count_thresholds(cells: int) -> np.ndarray:
  """f32 [cells]: for k = 1..cells, the largest float32 s with target_count(float(s), cells) >= k.

  The count falls as s grows (every float64 step rounds monotonically), so a bisection over float32 bit
  patterns in [0, 1] finds each edge; 0 keeps every cell and 1 none. Matching the float64 formula edge by
  edge, rather than evaluating it in float32, keeps a traced target's count exact at halves.
  """
  k = np.arange(1, cells + 1)
  low = np.zeros(cells, np.int32)                                  # bits of 0.0: count = cells >= k
  high = np.full(cells, np.float32(1.0).view(np.int32))            # bits of 1.0: count = 0 < k
  while np.any(high - low > 1):
    middle = (low + high) // 2
    count = np.floor((1.0 - middle.view(np.float32).astype(np.float64)) * cells + 0.5)
    low, high = np.where(count >= k, middle, low), np.where(count >= k, high, middle)
  return low.view(np.float32)


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
    int [rows]; int32 [rows] for a traced total (`_traced_row_budgets`, the same counts).
  """
  if isinstance(total, jax.Array):
    return _traced_row_budgets(available, forced, total)
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


def _traced_row_budgets(available: np.ndarray, forced: np.ndarray, total: jax.Array) -> jax.Array:
  """`row_budgets` for an int32 [] total: the fill of every level is static, so the largest level that
  fits is a count of them, and the last growing rows are found from the end by a cumulative sum."""
  total = jnp.clip(total, int(forced.sum()), int(available.sum()))
  levels = np.arange(int(available.max(initial=0)) + 1)[:, None]
  fills = np.clip(levels, forced, available).sum(axis=1)            # [levels], non-decreasing
  low = jnp.sum(fills <= total, dtype=jnp.int32) - 1
  counts = jnp.clip(low, forced, available).astype(jnp.int32)
  growing = jnp.clip(low + 1, forced, available) > counts
  remainder = total - counts.sum()
  from_end = jnp.cumsum(growing[::-1])[::-1]                       # growing rows at or after each row
  return counts + (growing & (from_end <= remainder))


def keep_top(score: np.ndarray | jax.Array, valid: np.ndarray, forced: np.ndarray,
             counts: np.ndarray) -> np.ndarray | jax.Array:
  """In each row, the `counts[row]` valid cells with the highest score, forced cells first.

  Ties go to the lower column (a stable sort), so the count is exact whatever the scores. Static numpy
  scores give a numpy mask (a compile-time constant); jax scores a jax mask.

  The mask is what a stable descending argsort would rank below `counts[row]`, found with no ranks: the
  cut is the row's counts-th largest score v; cells above v are kept, and of the cells equal to v the
  first counts − #(above v) by column. A cell above v ranks below #(above v) <= counts − 1, a cell below
  v at or after #(>= v) >= counts, and a tied cell at #(above v) + #(tied at lower columns). Scores are
  compared as integers in the sort's total order (−0 equal to 0, NaN after −inf), so this holds for every
  value. Numpy finds v by a sort; jax by a bitwise search (`kth_largest`: 32 compare-and-count passes,
  about 3x faster than XLA's sort on CPU at S = 2048, and no sort on a GPU), and takes the tied
  cells by column with a cumulative sum only when some row has more of them than it keeps (with float
  scores almost never).

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
  if xp is np:
    at = np.broadcast_to(np.clip(cols - counts, 0, cols - 1), (*key.shape[:-1], 1))
    cut = np.take_along_axis(np.sort(key, axis=-1), at, axis=-1)       # The counts-th largest; any if 0.
  else:
    cut = kth_largest(key, counts)
  above, tied = key > cut, key == cut
  room = counts - above.sum(axis=-1, keepdims=True)                    # 0 when counts is 0: none kept.
  by_column = lambda: above | (tied & (xp.cumsum(tied, axis=-1) <= room))
  if xp is np:
    return by_column() & valid
  enough = jnp.all(tied.sum(axis=-1, keepdims=True) <= room)           # Every tied cell fits: keep them all.
  return jax.lax.cond(enough, lambda: above | tied, by_column) & valid


def kth_largest(key: jax.Array, counts: jax.Array) -> jax.Array:
  """Each row's counts-th largest key (the largest when counts is 0, whatever it is then), bit by bit.

  From the top bit down, a bit is set when at least `counts` keys are still >= the value so far with it:
  the result is the largest v with #(key >= v) >= counts, i.e. the counts-th largest. One compare-and-
  count pass over the row per bit (32 for int32), and no data-dependent loop, so a GPU never waits on
  the host.

  Args:
    key: int32 or int64 [..., rows, cols] (`order_key`).
    counts: int [rows, 1].

  Returns:
    key.dtype [..., rows, 1].
  """
  bits = 8 * key.dtype.itemsize
  signed, unsigned = key.dtype, jnp.dtype(f"uint{bits}")
  sign = np.array(np.iinfo(signed).min, signed)
  ordered = jax.lax.bitcast_convert_type(key ^ sign, unsigned)          # Signed order as unsigned order.
  # Padding with 0 adds nothing: every candidate has a bit set. Rows of 128 columns are summed in int16
  # first (XLA's CPU reduction is about 3x faster over an int16 axis of vectors than along an int32 row).
  pad = -key.shape[-1] % 128
  ordered = jnp.pad(ordered, [(0, 0)] * (key.ndim - 1) + [(0, pad)])
  lanes = ordered.reshape(*ordered.shape[:-1], -1, 128)                 # [..., rows, cols / 128, 128]
  value = jnp.zeros((*key.shape[:-1], 1), unsigned)
  for bit in reversed(range(bits)):  # Unrolled: a GPU while loop would read its predicate on the host.
    candidate = value | np.array(1 << bit, unsigned)
    at_least = jnp.sum(lanes >= candidate[..., None], axis=-2, dtype=jnp.int16)
    value = jnp.where(jnp.sum(at_least, axis=-1, keepdims=True, dtype=jnp.int32) >= counts, candidate, value)
  return jax.lax.bitcast_convert_type(value, signed) ^ sign


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
