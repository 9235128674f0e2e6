"""mask_to_kv_indices against a plain numpy compaction."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kernels.block_index import mask_to_kv_indices


def _numpy_kv_indices(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  indices = np.zeros(mask.shape, np.int32)
  counts = mask.sum(-1).astype(np.int32)
  for row in np.ndindex(mask.shape[:-1]):
    kept = np.flatnonzero(mask[row])
    if kept.size:
      indices[row][: kept.size] = kept
      indices[row][kept.size:] = kept[-1]
  return indices, counts


@pytest.mark.parametrize("n_k, density", [(1, 0.5), (7, 0.3), (16, 0.5), (33, 0.1), (64, 0.9)])
def test_matches_numpy_compaction(n_k, density):
  rng = np.random.default_rng(n_k)
  mask = rng.random((2, 3, 5, n_k)) < density
  mask[0, 0, 0] = False  # an empty row
  mask[1, 2, 4] = True  # a full row
  indices, counts = jax.jit(mask_to_kv_indices)(mask)
  expected_indices, expected_counts = _numpy_kv_indices(mask)
  np.testing.assert_array_equal(np.asarray(counts), expected_counts)
  np.testing.assert_array_equal(np.asarray(indices), expected_indices)
  assert indices.dtype == counts.dtype == np.int32


def test_kept_prefix_is_ascending_and_padding_repeats_the_last_block():
  mask = np.zeros((1, 1, 1, 8), bool)
  mask[..., [1, 4, 6]] = True
  indices, counts = mask_to_kv_indices(mask)
  assert int(counts[0, 0, 0]) == 3
  np.testing.assert_array_equal(np.asarray(indices[0, 0, 0]), [1, 4, 6, 6, 6, 6, 6, 6])


@pytest.mark.parametrize("q_len,kv_len,block_q,block_k,window", [
    (64, 64, 16, 16, 1), (64, 64, 16, 16, 3), (50, 70, 16, 16, 2), (64, 64, 32, 16, 2), (40, 64, 16, 32, 1),
    (70, 40, 16, 16, 2), (64, 64, 16, 16, 0)])
def test_local_block_mask_matches_a_token_level_definition(q_len, kv_len, block_q, block_k, window):
  from kernels.block_index import causal_block_mask, local_block_mask
  mask = local_block_mask(q_len, kv_len, block_q=block_q, block_k=block_k, window=window)
  # Brute force: the key block holding the row's last query's own key, and the window - 1 blocks before.
  expected = np.zeros_like(mask)
  for i in range(mask.shape[0]):
    own_key = min((i + 1) * block_q, q_len) - 1 + kv_len - q_len
    if own_key < 0:
      continue
    for j in range(own_key // block_k - window + 1, own_key // block_k + 1):
      if j >= 0:
        expected[i, j] = True
  np.testing.assert_array_equal(mask, expected)
  # The band never leaves the causal region, and a window of 1 or more always holds the diagonal block.
  assert not (mask & ~causal_block_mask(q_len, kv_len, causal=True, block_q=block_q, block_k=block_k)).any()
  assert mask.sum() == expected.sum() and (window == 0) == (mask.sum() == 0)


def test_q_indices_list_each_key_blocks_readers_per_kv_head():
  """The backward's transposed lists: entry g * n_q + i for every head g of the group keeping block j."""
  from kernels.block_index import mask_to_q_indices
  rng = np.random.default_rng(0)
  batch, heads, kv_heads, n_q, n_k = 2, 6, 2, 3, 5
  mask = rng.random((batch, heads, n_q, n_k)) < 0.4
  indices, counts = mask_to_q_indices(mask, kv_heads)
  group = heads // kv_heads
  for b, c, j in np.ndindex(batch, kv_heads, n_k):
    expected = [g * n_q + i for g in range(group) for i in range(n_q) if mask[b, c * group + g, i, j]]
    assert int(counts[b, c, j]) == len(expected)
    np.testing.assert_array_equal(np.asarray(indices[b, c, j, :len(expected)]), expected)


def test_nonfinite_kept_blocks_flags_rows_reading_a_bad_key_block():
  from kernels.block_index import nonfinite_kept_blocks
  k = np.zeros((1, 40, 1, 4), np.float32)   # 3 key blocks of 16 (the last one ragged)
  v = np.zeros_like(k)
  k[0, 20, 0, 1] = np.inf                   # key block 1
  v[0, 39, 0, 0] = np.nan                   # key block 2
  mask = np.zeros((1, 2, 4, 3), bool)       # 2 query heads share the kv head
  mask[0, 0, 0, 0] = mask[0, 0, 1, 1] = mask[0, 1, 2, 2] = mask[0, 1, 3, :1] = True
  indices, counts = mask_to_kv_indices(mask)
  flags = nonfinite_kept_blocks(k, v, indices, counts, 16)
  np.testing.assert_array_equal(np.asarray(flags), [[[0, 1, 0, 0], [0, 0, 1, 0]]])


@pytest.mark.parametrize("shape, density", [
    ((2, 3, 5, 1), 0.5), ((1, 2, 7, 7), 0.3), ((2, 2, 4, 33), 0.1), ((1, 4, 3, 64), 0.9), ((3, 1, 1, 130), 0.5),
    ((1, 1, 2, 9), 0.0), ((1, 1, 2, 9), 1.0)])
def test_scatter_compaction_is_bit_identical_to_the_argsort_one(shape, density):
  """Both compactions on random masks with empty and full rows, ragged widths; jitted and not."""
  rng = np.random.default_rng(sum(shape))
  mask = rng.random(shape) < density
  mask[(0,) * (len(shape) - 1)] = False                      # an empty row
  mask[tuple(n - 1 for n in shape[:-1])] = True              # a full row
  expected = mask_to_kv_indices(mask, method="argsort")
  for compact in (jax.jit(lambda m: mask_to_kv_indices(m, method="scatter")),
                  lambda m: mask_to_kv_indices(m, method="scatter")):
    indices, counts = compact(mask)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(expected[1]))
    assert indices.dtype == counts.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(expected[0]), _numpy_kv_indices(mask)[0])


def test_auto_compaction_sorts_on_cpu_and_rejects_unknown_methods():
  from kernels import block_index
  assert jax.default_backend() != "cpu" or block_index.COMPACTION_METHOD.get("cpu", "argsort") == "argsort"
  with pytest.raises(ValueError, match="method='bogus'"):
    mask_to_kv_indices(np.ones((1, 1, 1, 2), bool), method="bogus")
