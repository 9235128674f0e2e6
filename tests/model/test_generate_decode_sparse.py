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
from kernels.decode_sparse_reference import key_block_sums

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

  # The Pallas kernel (interpreted), in one program per head or split-K, walking XLA's kept lists or
  # choosing inside the kernel, gives the reference's logits.
  for splits, selection in ((1, "lists"), (2, "lists"), (1, "in_kernel"), (2, "pallas_lists")):
    kernel = DecodeSparseAttention(top_k=1, block_size=BLOCK, sink=False, backend="interpret", num_splits=splits,
                                   selection=selection)
    # 1e-4: on a GPU the interpreted kernel's products round differently from the reference's (3.7e-5 seen on an
    # H200); dropping a block moves the logits by more than 1e-3 (above).
    np.testing.assert_allclose(np.asarray(model.decode(chunk, cache, decode_policy=kernel)[0]), np.asarray(sparse),
                               atol=1e-4, rtol=0)
  assert f"selection={selection!r}" in repr(kernel)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of tau and top_k"),
    (dict(tau=0.5, top_k=1), "exactly one of tau and top_k"),
    (dict(top_k=1.5), "top_k must be integer"),
    (dict(tau=np.ones((2, 2, 2))), r"tau must be a scalar, \[heads\] or \[layers, heads\]"),
    (dict(tau=0.5, backend="gpu"), "backend must be one of"),
    (dict(tau=0.5, block_size=24), "block_size must be a power of two"),
    (dict(tau=0.5, num_splits=0), "num_splits must be an integer >= 1 or None"),
    (dict(tau=0.5, selection="fused"), r"selection must be one of \('lists', 'in_kernel', 'pallas_lists'\)"),
])
def test_policy_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DecodeSparseAttention(**kwargs)


# ------------------------------------------------------------------------------------------------------
# Running key sums in the cache, and the measured decode sparsity.

LONG = (150, 60)  # 12 blocks of 16 once NEW tokens are added: room for τ < 1 to drop some


@pytest.fixture(scope="module")
def long_prompts() -> list[list[int]]:
  rng = np.random.default_rng(1)
  return [rng.integers(0, 256, size=length).tolist() for length in LONG]


def _greedy_steps(model, prompts, policy, steps):
  """Prefill, then `steps` greedy one-token decode steps through `Llama.decode`: (tokens, per step the
  per-layer kept blocks, the cache)."""
  padded = np.zeros((len(prompts), max(LONG)), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt)] = prompt
  logits, cache = model.prefill(padded, max_len=192, lengths=LONG,
                                key_block_size=BLOCK if policy.cached_means else None)
  tokens = np.argmax(np.asarray(logits)[np.arange(2), np.asarray(LONG) - 1], axis=-1)[:, None]
  generated, kept = [tokens[:, 0]], []
  for _ in range(steps):
    logits, cache, stats = model.decode(tokens.astype(np.int32), cache, decode_policy=policy, return_stats=True)
    tokens = np.argmax(np.asarray(logits)[:, -1], axis=-1)[:, None]
    generated.append(tokens[:, 0])
    kept.append(np.stack([np.asarray(layer.kept) for layer in stats]))
  return np.stack(generated, 1), kept, cache


def test_cached_key_sums_select_exactly_the_recomputed_blocks(model, long_prompts):
  """τ < 1: the cache's running sums (one block re-summed per step) and re-pooling the whole cache keep
  the same blocks at every step and layer, so the same tokens come out; the sums stay exact."""
  cached = DecodeSparseAttention(tau=0.6, block_size=BLOCK)
  pooled = DecodeSparseAttention(tau=0.6, block_size=BLOCK, cached_means=False)
  tokens, kept, cache = _greedy_steps(model, long_prompts, cached, 6)
  tokens_pooled, kept_pooled, pooled_cache = _greedy_steps(model, long_prompts, pooled, 6)
  np.testing.assert_array_equal(tokens, tokens_pooled)
  for step, step_pooled in zip(kept, kept_pooled):
    np.testing.assert_array_equal(step, step_pooled)
  assert pooled_cache.key_block_size is None and cache.key_block_size == BLOCK
  assert not all(step.all(axis=-1).all() for step in kept)  # really sparse: some valid block dropped
  lengths = cache.end_index
  for layer in cache.layers:
    valid = np.arange(192 // BLOCK)[None, :] * BLOCK < np.asarray(lengths)[:, None]
    np.testing.assert_array_equal(np.asarray(layer.key_sums)[valid],
                                  np.asarray(key_block_sums(layer.k, lengths, BLOCK))[valid])

  assert generate(model, long_prompts, NEW, decode_policy=cached, return_stats=True) == \
      generate(model, long_prompts, NEW, decode_policy=pooled, return_stats=True)


def test_a_decode_policy_must_use_the_block_of_the_cache_sums(model, long_prompts):
  _, cache = model.prefill(np.asarray([long_prompts[1]], np.int32), max_len=192, key_block_size=32)
  with pytest.raises(ValueError, match="block_size=16 differs from the block of the cache's key sums"):
    model.decode(np.zeros((1, 1), np.int32), cache, decode_policy=DecodeSparseAttention(tau=0.5, block_size=BLOCK))


def test_generation_stats_report_the_measured_decode_sparsity(model, long_prompts):
  """Dense decode reads every block (0); a budget's sparsity is the mean of what each step reports."""
  dense, stats = generate(model, long_prompts, NEW, return_stats=True)
  assert dense == generate(model, long_prompts, NEW)
  assert (stats.decode_steps, stats.sequence_steps, stats.decode_sparsity) == (NEW - 1, 2 * (NEW - 1), 0.0)

  budget = DecodeSparseAttention(top_k=2, block_size=BLOCK)
  new, stats = generate(model, long_prompts, NEW, decode_policy=budget, return_stats=True)
  assert new == generate(model, long_prompts, NEW, decode_policy=budget)
  padded_steps = []
  tokens, kept, _ = _greedy_steps(model, long_prompts, budget, NEW - 1)
  assert tokens.tolist() == new
  for step, step_kept in enumerate(kept):  # step s feeds token s: the cache holds LONG + s + 1 slots
    valid = -(-(np.asarray(LONG) + step + 1) // BLOCK)
    padded_steps.append(1.0 - step_kept.sum(-1) / valid[None, :, None])   # [layers, batch, heads]
  expected = np.mean(padded_steps, axis=(0, 2, 3))
  np.testing.assert_allclose(stats.layer_sparsity, expected, rtol=1e-6)
  assert len(stats.layer_sparsity) == 2 and 0.2 < stats.decode_sparsity < 0.6
  assert stats.kept_fraction == pytest.approx(1.0 - stats.decode_sparsity)


def test_finished_sequences_stop_counting(model, long_prompts):
  free = generate(model, long_prompts, NEW)
  stop = free[0][3]  # sequence 0 stops after its 4th token (sequence 1 maybe too)
  new, stats = generate(model, long_prompts, NEW, stop_tokens=[stop], return_stats=True,
                        decode_policy=DecodeSparseAttention(top_k=2, block_size=BLOCK))
  assert stats.sequence_steps == sum(len(row) - 1 for row in new) < 2 * stats.decode_steps
