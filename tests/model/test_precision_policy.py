"""The precision policy (`afbs_jax.attention.policy`): dense and block-sparse attention agree when every
block is kept.

SpargeAttention at τ = 1, θ = 1, λ = −∞ keeps every causal block, so on the jnp reference backend it must
compute what `DenseAttention` computes: logits, softmax and P·V accumulated in f32, one rounding to the
input dtype at the end. The two differ only in the order of f32 sums, so in bf16 an element may land on
the other side of a rounding boundary (1 ulp) in a few elements per ten thousand; before the policy the
dense path rounded P to bf16 and about a fifth of the elements differed. Through a bf16 residual stream
those few 1-ulp flips are amplified like any other rounding difference (30 layers of SmolLM2 turn them
into logit differences of the same size as swapping two f32 summation orders of dense attention itself,
~0.1 mean), so the model-level equality is checked where it is tight: in f32 on the real weights, and on
the 2-layer tiny model in bf16 against one bf16 ulp of its logits.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from afbs_jax.attention import DenseAttention, SpargeAttention, dense_reference
from afbs_jax.model import iter_layer_qkv
from afbs_jax.model.weights import init_random
from configs import tiny

BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2^-7: one ulp is at most this times the value
# Elements allowed to differ (by one ulp) between two f32-accumulating paths rounded to bf16. Measured
# 1e-4 to 3e-4 on SmolLM2's and the tiny model's Q/K/V; the old bf16-P dense path differed in 15–25 %.
MAX_FLIPPED = 2e-3


def all_kept(num_layers: int, num_heads: int, block: int) -> SpargeAttention:
  return SpargeAttention.constant(num_layers, num_heads, tau=1.0, theta=1.0, lam=-np.inf, block_q=block,
                                  block_k=block, backend="reference")


def assert_within_one_ulp(actual, expected, *, max_flipped: float = MAX_FLIPPED):
  """bf16 arrays equal but for rare one-ulp rounding flips.

  One ulp is at most BF16_EPS relative; near zero, where the f32 sums cancel, the f32 error itself
  (~1e-7 of the row's scale) decides the rounding, hence the small absolute term."""
  assert actual.dtype == expected.dtype == jnp.bfloat16, (actual.dtype, expected.dtype)
  a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  np.testing.assert_allclose(a, e, rtol=BF16_EPS, atol=1e-5 * np.abs(e).max())
  flipped = float(np.mean(a != e))
  assert flipped <= max_flipped, f"{flipped:.3%} of elements differ (at most {max_flipped:.3%} allowed)"


def tiny_model(param_dtype: str, seed: int = 0):
  return init_random(dataclasses.replace(tiny.MODEL, param_dtype=param_dtype), seed=seed)


def test_dense_attention_rounds_once_from_f32():
  """DenseAttention in bf16 = the f32 reference rounded to bf16 (GQA, prefill and decode positions)."""
  rng = np.random.default_rng(0)  # numpy: jax.random would compile a threefry program per shape (~1 s each)
  q = jnp.asarray(rng.standard_normal((2, 128, 8, 64)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((2, 128, 2, 64)), jnp.bfloat16) for _ in range(2))
  expected = dense_reference(q, k, v).astype(jnp.bfloat16)
  assert_within_one_ulp(DenseAttention()(q, k, v, layer=0), expected)
  step = DenseAttention()(q[:, 100:], k, v, layer=0, q_positions=jnp.arange(100, 128))
  assert_within_one_ulp(step, expected[:, 100:])


def test_all_kept_sparse_matches_dense_per_layer_bf16():
  model = tiny_model("bfloat16")
  config = model.config
  policy = all_kept(config.num_layers, config.num_heads, block=16)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 128)).astype(np.int32)
  for layer, q, k, v in iter_layer_qkv(model, tokens):
    assert_within_one_ulp(policy(q, k, v, layer=layer), DenseAttention()(q, k, v, layer=layer))


def test_all_kept_sparse_model_logits_match_dense_tiny_f32():
  model = tiny_model("float32", seed=1)
  config = model.config
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 128)).astype(np.int32)
  sparse = model.with_attention(all_kept(config.num_layers, config.num_heads, block=16))
  np.testing.assert_allclose(np.asarray(sparse(tokens)), np.asarray(model(tokens)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 3])
def test_all_kept_sparse_model_logits_match_dense_tiny_bf16(seed):
  """The residual stream rounds to bf16 in every layer, so a one-ulp flip in attention reaches the logits.

  Measured mean |Δ| 0 (seed 0) and 4.6e-5 (seed 3) with the policy, 4e-4 with the old bf16-P dense path
  (max 0 / 1.4e-3 against 2.9e-3), on logits of magnitude ~0.7."""
  model = tiny_model("bfloat16", seed=seed)
  config = model.config
  tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (2, 128)).astype(np.int32)
  dense = np.asarray(model(tokens))
  sparse = np.asarray(model.with_attention(all_kept(config.num_layers, config.num_heads, block=16))(tokens))
  assert np.abs(sparse - dense).mean() <= 1.5e-4
  np.testing.assert_allclose(sparse, dense, rtol=0, atol=BF16_EPS / 2 * np.abs(dense).max())


def _eager_logits(model, tokens, policy, record=None):
  """Un-jitted forward (compiles each op once instead of a 30-layer graph per policy; fast on CPU).

  `record`, if a list, receives each layer's (q, k, v)."""
  def attend(q, k, v, *, layer):
    if record is not None:
      record.append((q, k, v))
    return policy(q, k, v, layer=layer)
  return np.asarray(model.with_attention(attend).apply(jnp.asarray(tokens)))


@pytest.mark.slow
def test_all_kept_sparse_matches_dense_on_smollm2():
  """The embedded SmolLM2-135M GGUF on 128 tokens of held-out text (about 20 s on a 2-core CPU).

  Model logits in f32 (its real weights), and every layer's attention in bf16 on its real Q/K/V.
  """
  from afbs_jax.data import load_corpus  # pylint: disable=g-import-not-at-top
  from afbs_jax.model.gguf_loader import load_gguf  # pylint: disable=g-import-not-at-top
  model, tokenizer = load_gguf(param_dtype="float32")
  config = model.config
  tokens = np.asarray([tokenizer.encode(load_corpus("sotu").test)[:128]], np.int32)
  policy = all_kept(config.num_layers, config.num_heads, block=32)
  qkv = []
  dense = _eager_logits(model, tokens, DenseAttention(), record=qkv)
  sparse = _eager_logits(model, tokens, policy)
  # Measured max |diff| 9e-5 on logits of magnitude ~35 (jax 0.10.2, 2-core CPU): a 20x margin.
  np.testing.assert_allclose(sparse, dense, rtol=0, atol=2e-3)
  for layer, (q, k, v) in enumerate(qkv):
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    assert_within_one_ulp(policy(q, k, v, layer=layer), DenseAttention()(q, k, v, layer=layer))
