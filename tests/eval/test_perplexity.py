"""Tests for afbs_jax.eval.perplexity: the sliding-window recipe against a brute-force per-token computation."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afbs_jax import eval as eval_lib

VOCAB = 16


class PrefixSumModel:
  """A fake LM whose logits at position t depend on every window token up to t.

  logits[b, t] = cumsum(embedding[tokens[b, :t + 1]]) @ unembedding / 16. Small integers and
  dyadic weights keep every logit exact in float32, so batch and padding cannot change a value.
  """

  def __init__(self, max_positions: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.embedding = rng.integers(-3, 4, (VOCAB, 4)).astype(np.float32)
    self.unembedding = rng.integers(-2, 3, (4, VOCAB)).astype(np.float32) / 16
    self.config = types.SimpleNamespace(max_position_embeddings=max_positions, vocab_size=VOCAB)
    self.traces = 0

  def __call__(self, tokens):
    self.traces += 1  # Runs once per trace under jit.
    prefix = jnp.cumsum(jnp.asarray(self.embedding)[tokens], axis=1)  # [batch, seq, 4]
    return prefix @ jnp.asarray(self.unembedding)  # [batch, seq, vocab]


def _tokens(num_tokens: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, num_tokens).astype(np.int32)


def _brute_force(model, tokens: np.ndarray, context: int, stride: int) -> tuple[float, int]:
  """Scores each token p >= 1 in the first window [begin, begin + context) that holds p and p - 1."""
  values = []
  for position in range(1, len(tokens)):
    begins = [b for b in range(0, len(tokens), stride) if b + 1 <= position < min(b + context, len(tokens))]
    if not begins:
      continue
    begin = begins[0]
    window = tokens[begin:min(begin + context, len(tokens))]
    log_probs = jax.nn.log_softmax(model(window[None])[0, position - begin - 1].astype(jnp.float32))
    values.append(-float(log_probs[tokens[position]]))
  return math.fsum(values), len(values)


CASES = [  # (num_tokens, context, stride)
    (50, 16, 8),
    (50, 16, 16),  # stride == context: disjoint windows
    (37, 16, 5),  # length not a multiple of the stride
    (10, 16, 4),  # text shorter than one window
    (65, 8, 3),
    (17, 8, 8),  # the last window [16, 17) scores nothing and is skipped
    (2, 2, 1),
]


@pytest.mark.parametrize("num_tokens, context, stride", CASES)
def test_matches_brute_force_exactly(num_tokens, context, stride):
  model, tokens = PrefixSumModel(), _tokens(num_tokens)
  result = eval_lib.perplexity_with_stats(model, tokens, context, stride, batch_size=3, progress=False)
  expected_sum, expected_count = _brute_force(model, tokens, context, stride)
  assert result.nll_sum == expected_sum
  assert result.num_scored == expected_count
  assert result.ppl == pytest.approx(math.exp(expected_sum / expected_count), rel=1e-12)


@pytest.mark.parametrize("num_tokens, context, stride", CASES)
def test_each_token_scored_once(num_tokens, context, stride):
  windows = eval_lib.sliding_windows(num_tokens, context, stride)
  scored = np.zeros(num_tokens, int)
  for window in windows:
    assert window.begin < window.score_from < window.end <= window.begin + context
    scored[window.score_from:window.end] += 1
  assert scored.max() == 1 and scored[0] == 0
  if stride < context:  # Overlapping windows score every token after the first.
    assert scored[1:].min() == 1
  else:  # Disjoint windows leave each window's first token unscored, as the reference recipe does.
    assert np.flatnonzero(scored == 0).tolist() == list(range(0, num_tokens, context))


def test_window_layout_follows_the_recipe():
  assert eval_lib.sliding_windows(20, 8, 4) == [(0, 8, 1), (4, 12, 8), (8, 16, 12), (12, 20, 16)]
  assert eval_lib.sliding_windows(21, 8, 8) == [(0, 8, 1), (8, 16, 9), (16, 21, 17)]


def test_batching_and_padding_do_not_change_the_result():
  model, tokens = PrefixSumModel(), _tokens(83)
  results = [eval_lib.perplexity_with_stats(model, tokens, 16, 6, batch_size=size, progress=False)
             for size in (1, 2, 5, 13, 32)]
  assert len({(r.num_scored, r.windows) for r in results}) == 1
  assert results[0].windows == 13 and results[0].num_scored == 82
  assert len({r.nll_sum for r in results[:4]}) == 1
  # At [32, 16, 16] XLA:CPU reduces the vocabulary axis in another order, so the sum may move by an ulp or so.
  assert results[4].nll_sum == pytest.approx(results[0].nll_sum, rel=1e-6)


def test_one_compilation_for_all_batches():
  model = PrefixSumModel()
  eval_lib.perplexity_with_stats(model, _tokens(70), 16, 4, batch_size=3, progress=False)
  assert model.traces == 1  # 14 windows in 5 batches, the last window and batch padded to one shape.


def test_max_tokens_truncates_and_perplexity_returns_ppl():
  model, tokens = PrefixSumModel(), _tokens(90)
  truncated = eval_lib.perplexity_with_stats(model, tokens, 16, 8, max_tokens=40, progress=False)
  assert truncated.nll_sum == _brute_force(model, tokens[:40], 16, 8)[0]
  assert eval_lib.perplexity(model, tokens[:40], 16, 8, progress=False) == truncated.ppl
  assert truncated.tokens_per_second > 0 and truncated.num_scored == 39


@pytest.mark.parametrize("tokens, kwargs, message", [
    (np.arange(10), dict(context=256), "context=256 exceeds the model's max_position_embeddings=128"),
    (np.arange(10), dict(context=1), "context=1 must be >= 2"),
    (np.arange(10), dict(context=8, stride=9), r"stride=9 must be in \[1, context=8\]"),
    (np.arange(10), dict(context=8, stride=0), r"stride=0 must be in \[1, context=8\]"),
    (np.arange(10), dict(batch_size=0), "batch_size=0"),
    (np.array([3]), {}, "1 tokens; perplexity needs at least 2"),
    (np.array([], np.int32), {}, "0 tokens"),
    (np.arange(10), dict(max_tokens=1), "max_tokens=1"),
    (np.linspace(0, 5, 10), {}, "must be integers; got dtype float64"),
    (np.ones((2, 5), np.int32), {}, r"one sequence \[num_tokens\]; got shape \(2, 5\)"),
    (np.array([1, 2, VOCAB]), {}, r"\[0, 16\)"),
    (np.array([1, -1, 2]), {}, r"\[0, 16\)"),
])
def test_bad_arguments_raise_value_error(tokens, kwargs, message):
  kwargs = {"context": 8, "stride": 4, **kwargs}
  with pytest.raises(ValueError, match=message):
    eval_lib.perplexity_with_stats(PrefixSumModel(), tokens, progress=False, **kwargs)


def test_corpus_token_ids_prepends_bos_once():
  tokenizer = types.SimpleNamespace(encode=lambda text: [ord(c) - 96 for c in text], bos_id=0)
  np.testing.assert_array_equal(eval_lib.corpus_token_ids(tokenizer, "abc"), [1, 2, 3])
  np.testing.assert_array_equal(eval_lib.corpus_token_ids(tokenizer, "abc", add_bos=True), [0, 1, 2, 3])
  tokenizer.bos_id = None
  with pytest.raises(ValueError, match="no BOS"):
    eval_lib.corpus_token_ids(tokenizer, "abc", add_bos=True)


def _causal_mean_attention(q, k, v, *, layer):
  """A stand-in policy: each query averages the values at and before it (GQA heads shared)."""
  del q, k, layer
  counts = jnp.arange(1, v.shape[1] + 1, dtype=v.dtype)[None, :, None, None]
  return jnp.repeat(jnp.cumsum(v, axis=1) / counts, 2, axis=2)  # [batch, T, heads, head_dim]


# Policies are pytrees (their threshold arrays are traced state), hence the Partial wrapper.
@pytest.mark.parametrize("policy", [None, jax.tree_util.Partial(_causal_mean_attention)], ids=["dense", "custom_policy"])
def test_tiny_llama_matches_brute_force(policy):
  configs = pytest.importorskip("configs")
  model_lib = pytest.importorskip("afbs_jax.model")
  config = configs.get_config("tiny").model
  model = model_lib.init_random(config, seed=0)
  if policy is not None:
    model = model.with_attention(policy)
  tokens = np.random.default_rng(3).integers(0, config.vocab_size, 45).astype(np.int32)
  result = eval_lib.perplexity_with_stats(model, tokens, 16, 8, batch_size=2, progress=False)
  expected_sum, expected_count = _brute_force(model, tokens, 16, 8)
  assert result.num_scored == expected_count == 44
  assert result.nll_sum == pytest.approx(expected_sum, rel=1e-5)
  # Random weights: close to uniform over the vocabulary.
  assert config.vocab_size / 2 < result.ppl < config.vocab_size * 2
