"""Block-sparse decode steps (`DecodeSparseAttention`) in the cached forward and in `generate`, on the tiny
random model (float32): keeping every block is dense decoding; a small budget really changes attention.

Prompts have lengths 37 and 9, so with NEW new tokens the cache holds 64 slots: four blocks of 16.
"""

from __future__ import annotations

import numpy as np
import pytest

import configs
from afbs_jax.attention import DecodeSparseAttention
from afbs_jax.model import generate, init_random

NEW = 10
BLOCK = 16


@pytest.fixture(scope="module")
def model():
  return init_random(configs.get_config("tiny").model, seed=0)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, size=length).tolist() for length in (37, 9)]


def test_keep_all_generation_equals_dense_generation(model, prompts):
  keep_all = DecodeSparseAttention(tau=1.0, block_size=BLOCK)
  assert generate(model, prompts, NEW, decode_policy=keep_all) == generate(model, prompts, NEW)


def test_decode_policy_in_the_cached_forward(model, prompts):
  """τ = 1 reproduces dense decode logits; a one-block budget (the sink and local blocks aside) does not."""
  padded = np.zeros((2, 37), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt)] = prompt
  _, cache = model.prefill(padded, max_len=64, lengths=[37, 9])
  chunk = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
  dense, _ = model.decode(chunk, cache)
  config = model.config
  keep_all = DecodeSparseAttention(tau=np.ones((config.num_layers, config.num_heads)), block_size=BLOCK)
  sparse_all, new_cache = model.decode(chunk, cache, decode_policy=keep_all)
  np.testing.assert_allclose(np.asarray(sparse_all), np.asarray(dense), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(new_cache.end_index), [40, 12])

  budget = DecodeSparseAttention(top_k=1, block_size=BLOCK, sink=False)
  sparse, _ = model.decode(chunk, cache, decode_policy=budget)
  gap = np.abs(np.asarray(sparse) - np.asarray(dense))
  assert np.isfinite(np.asarray(sparse)).all()
  # Row 1 (12 tokens) fits one block: nothing to drop. Row 0 (40 tokens, 3 blocks) keeps 2 of them.
  assert gap[1].max() < 1e-5 and gap[0].max() > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of tau and top_k"),
    (dict(tau=0.5, top_k=1), "exactly one of tau and top_k"),
    (dict(top_k=1.5), "top_k must be integer"),
    (dict(tau=np.ones((2, 2, 2))), r"tau must be a scalar, \[heads\] or \[layers, heads\]"),
    (dict(tau=0.5, backend="gpu"), "backend must be one of"),
    (dict(tau=0.5, block_size=24), "block_size must be a power of two"),
])
def test_policy_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DecodeSparseAttention(**kwargs)
