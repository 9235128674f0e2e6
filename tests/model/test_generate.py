"""Generation with the KV cache: cached logits and greedy tokens against full forwards, batching, stop
tokens, top-p sampling and the user errors, on the tiny random model (float32).

Prompts have lengths 37 and 9 (not multiples of the sparse block size) and share shapes across tests, so
the file compiles each prefill and decode loop once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from afbs_jax.errors import UserInputError
from afbs_jax.model import DenseAttention, SpargeAttention, generate, init_random
from afbs_jax.model.generation import sample_next

NEW = 10
TOLERANCE = 1e-5  # max |Δlogit|, float32


@pytest.fixture(scope="module")
def model():
  return init_random(configs.get_config("tiny").model, seed=0)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, size=length).tolist() for length in (37, 9)]


@pytest.fixture(scope="module")
def greedy_alone(model, prompts) -> list[list[int]]:
  """Each prompt's greedy continuation, generated on its own."""
  return [generate(model, [prompt], NEW)[0] for prompt in prompts]


class PromptSparse:
  """What a sparse prefill followed by dense decode steps computes, as one full-sequence policy: the first
  `length` queries attend sparsely over the first `length` keys (the prefill call), the rest densely."""

  def __init__(self, sparse, length: int):
    self.sparse, self.length = sparse, length

  def __call__(self, q, k, v, *, layer):
    n = self.length
    prefix = self.sparse(q[:, :n], k[:, :n], v[:, :n], layer=layer)
    return jnp.concatenate([prefix, DenseAttention()(q, k, v, layer=layer)[:, n:]], axis=1)


def test_cached_logits_equal_full_forward_logits(model, prompts):
  """Right-padded prefill, a 3-token chunk, then a 1-token chunk, against a full forward of each sequence."""
  rng = np.random.default_rng(1)
  lengths = np.array([len(prompt) for prompt in prompts])
  # [2, 47]: each prompt and NEW more tokens, right-padded (the rescoring shape of the greedy tests).
  padded = np.zeros((2, lengths.max() + NEW), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt) + NEW] = prompt + rng.integers(0, 256, size=NEW).tolist()
  full = np.concatenate([np.asarray(model(row[None])) for row in padded])

  logits, cache = model.prefill(padded[:, :lengths.max()], max_len=64, lengths=lengths)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(logits)[row, :length], full[row, :length], atol=TOLERANCE, rtol=0)
  for chunk in (3, 1):
    start = np.asarray(cache.end_index)
    tokens = np.stack([padded[row, start[row]:start[row] + chunk] for row in range(2)])
    logits, cache = model.decode(tokens, cache)
    assert logits.shape == (2, chunk, 256)
    for row in range(2):
      np.testing.assert_allclose(np.asarray(logits)[row], full[row, start[row]:start[row] + chunk],
                                 atol=TOLERANCE, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache.end_index), lengths + 4)
  with pytest.raises(ValueError, match="does not fit a cache of batch 2, max_len=64 holding up to 41"):
    model.decode(np.zeros((2, 24), np.int32), cache)


@pytest.mark.parametrize("prefill", ["dense", "sparse"])
def test_greedy_equals_argmax_of_full_rescoring(model, prompts, prefill):
  """Token i is the argmax of a full forward over prompt + tokens[:i] at its last position. One forward
  over prompt + all tokens gives every step's logits: attention is causal, so later tokens change nothing
  at earlier positions. With a sparse prefill the full forward runs `PromptSparse`."""
  prompt = prompts[0]
  sparse = SpargeAttention.constant(2, 4, tau=0.3, theta=-1.0, lam=-np.inf, block_q=16, block_k=16,
                                    backend="reference")
  generating = model if prefill == "dense" else model.with_attention(sparse)
  rescoring = model if prefill == "dense" else model.with_attention(PromptSparse(sparse, len(prompt)))
  new = generate(generating, [prompt], NEW)[0]
  assert len(new) == NEW
  logits = np.asarray(rescoring(np.array([prompt + new], np.int32)))[0]
  np.testing.assert_array_equal(logits[len(prompt) - 1:-1].argmax(-1), new)
  if prefill == "sparse":  # the sparse prefill must matter, or this case tests nothing the dense one does not
    assert np.abs(logits - np.asarray(model(np.array([prompt + new], np.int32)))[0]).max() > 1e-3


def test_batch_equals_one_at_a_time(model, prompts, greedy_alone):
  assert generate(model, prompts, NEW) == greedy_alone
  # Padding further right (one shape for batches of other lengths) changes nothing under dense prefill.
  assert generate(model, prompts, NEW, pad_to=max(map(len, prompts)) + 37) == greedy_alone


def test_stop_tokens_end_each_sequence(model, prompts, greedy_alone):
  stop = greedy_alone[1][2]
  expected = [tokens[:tokens.index(stop) + 1] if stop in tokens else tokens for tokens in greedy_alone]
  assert generate(model, prompts, NEW, stop_tokens=(stop,)) == expected
  # Once every sequence has stopped, decoding ends.
  firsts = tuple(tokens[0] for tokens in greedy_alone)
  assert generate(model, prompts, NEW, stop_tokens=firsts) == [[tokens[0]] for tokens in greedy_alone]


def test_top_p_to_zero_is_greedy_and_sampling_follows_the_seed(model, prompts, greedy_alone):
  assert generate(model, prompts, NEW, temperature=1.0, top_p=1e-6, seed=3) == greedy_alone
  sampled = generate(model, prompts, NEW, temperature=1.0, seed=3)
  assert sampled == generate(model, prompts, NEW, temperature=1.0, seed=3)
  assert sampled != greedy_alone and all(len(tokens) == NEW for tokens in sampled)


def test_sample_next_draws_only_from_the_nucleus():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  draw = jax.vmap(lambda key: sample_next(logits, key, jnp.float32(1.0), jnp.float32(0.6)))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 1000))).ravel(), minlength=4)
  assert counts[0] == counts[2] == 0  # 0.5 + 0.3 >= 0.6: tokens 1 and 3 form the nucleus
  assert abs(counts[1] / counts.sum() - 0.5 / 0.8) < 0.05


@pytest.mark.parametrize("tokens, kwargs, match", [
    ([[]], {}, "prompt is empty"),
    ([[1, 2], []], {}, "one is empty"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ([[1] * 500], {"max_new_tokens": 13}, "500 tokens plus max_new_tokens=13 exceeds tiny's context of 512"),
    ([[1, 2]], {"temperature": -1.0}, "temperature must be >= 0"),
    ([[1, 2]], {"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
    ([[1, 2]], {"pad_to": 510}, "pad_to must be an integer that with max_new_tokens=.* fits tiny's context"),
])
def test_user_errors(model, tokens, kwargs, match):
  with pytest.raises(UserInputError, match=match):
    generate(model, tokens, **({"max_new_tokens": NEW} | kwargs))
