"""Text generation with `Llama`'s KV cache: greedy or temperature/top-p sampling, batched, with stop tokens.

`generate` prefills the right-padded prompts in one call of the model's own policy (a sparse policy runs
there exactly as it does for perplexity), then decodes one token per sequence per step with dense attention
against the cache (or a decode policy's block-sparse attention, `afbs_jax.attention.decode`), all steps in
one jitted `lax.while_loop` that ends when every sequence has produced a stop token. A Python loop around
a jitted step was measured first and was slower on a 2-core CPU: 3.5 against 0.15 ms per token on the tiny
model (dispatch, a host key split per step), 780 against 140 ms per token on SmolLM2-135M (bf16 weights,
whose conversion XLA can likely hoist out of the loop); on a GPU the loop also never waits on the host.
The cache is sized for the longest prompt plus `max_new_tokens`, rounded up to a multiple of
`_CACHE_BUCKET` slots, so that nearby lengths share one compilation (prefill: one per batch size, prompt
length and cache size; the decode loop: one per batch size and cache size, whatever the prefill policy,
temperature or top-p; a decode policy's static settings add one each, its τ / k values none).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.attention.dense import DenseAttention
from afbs_jax.errors import UserInputError

_CACHE_BUCKET = 64


def sample_next(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next tokens int32 [batch] from logits f32 [batch, vocab]: argmax when temperature == 0, else a draw
  from softmax(logits / temperature) restricted to the top-p nucleus (the fewest most likely tokens whose
  mass reaches top_p; the most likely token is always kept, so top_p -> 0 is greedy). Both traced: one
  compilation serves greedy decoding and every sampling setting."""

  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def nucleus(logits):
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)  # stable: ties keep argmax's order
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < top_p).at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jax.random.categorical(key, jnp.where(keep, logits, -jnp.inf), axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, nucleus, greedy, logits)


@functools.partial(jax.jit, static_argnums=0, static_argnames="max_len")
def _prefill_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array,
                  key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, max_len: int):
  """Prefill, then the first new token of every sequence (from its logits at lengths - 1)."""
  logits, cache = nnx.merge(graphdef, state).apply_prefill(tokens, lengths, max_len, last_only=True)
  return sample_next(logits[:, 0], key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def _decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: Any, first: jax.Array, stop: jax.Array,
                 max_new_tokens: jax.Array, key: jax.Array, temperature: jax.Array,
                 top_p: jax.Array, decode_policy: Any = None) -> tuple[jax.Array, jax.Array, Any]:
  """Decodes from the first new tokens int32 [batch] until every sequence has produced one of `stop` or
  `max_new_tokens` are out; returns (tokens int32 [batch, cache.max_len], the number of columns filled,
  the cache: returned so that the donated input's buffers hold it, with no second copy)."""
  model = nnx.merge(graphdef, state)
  out = jnp.zeros((first.shape[0], cache.max_len), jnp.int32).at[:, 0].set(first)

  def unfinished(carry):
    step, _, done, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def decode(carry):
    step, tokens, done, cache, out = carry
    logits, cache = model.apply_decode(tokens[:, None], cache, decode_policy=decode_policy)
    tokens = sample_next(logits[:, -1], jax.random.fold_in(key, step), temperature, top_p)
    return step + 1, tokens, done | jnp.isin(tokens, stop), cache, out.at[:, step].set(tokens)

  step, _, _, cache, out = jax.lax.while_loop(unfinished, decode,
                                              (jnp.int32(1), first, jnp.isin(first, stop), cache, out))
  return out, step, cache


def generate(model: Any, tokens: Any, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), seed: int = 0, decode_policy: Any = None) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: a `Llama`; its policy runs the prefill, decode steps attend densely against the cache.
    tokens: the prompts: int [batch, seq] or a sequence of int sequences of any lengths, batched together
      right-padded. With dense prefill each result is the one generated alone (up to float rounding); a
      block-sparse prefill pools a shorter prompt's padding into its last block's mask prediction, so its
      batched result may differ from the one alone.
    max_new_tokens: >= 1; every prompt's length plus this must fit the model's context.
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_p: in (0, 1], the nucleus kept when sampling (1 keeps every token).
    stop_tokens: ids that end a sequence; the stop token is the last id of its result.
    seed: the sampling key's seed (unused when greedy).
    decode_policy: None (dense decode steps) or a decode policy such as
      `afbs_jax.attention.decode.DecodeSparseAttention`, whose `decode` each step calls per layer; the
      cache is then sized in multiples of its block_size too (capped at the model's context, which its
      block_size must then divide).

  Returns:
    one list of new token ids per prompt.

  Raises:
    UserInputError: an empty prompt, max_new_tokens < 1, a prompt that with max_new_tokens exceeds the
      context, temperature < 0 or top_p outside (0, 1].
  """
  check_arguments(max_new_tokens, temperature=temperature, top_p=top_p)
  prompts = _prompts(tokens)
  limit = model.config.max_position_embeddings
  longest = max(len(prompt) for prompt in prompts)
  if longest + max_new_tokens > limit:
    raise UserInputError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                         f"{model.config.name}'s context of {limit} tokens")
  padded = np.zeros((len(prompts), longest), np.int32)  # right-padded
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt)] = prompt
  lengths = jnp.asarray([len(prompt) for prompt in prompts], jnp.int32)
  # The last new token is never fed back, so the cache holds longest + max_new_tokens - 1 positions; a
  # decode policy's cache blocks must tile it.
  bucket = math.lcm(_CACHE_BUCKET, int(getattr(decode_policy, "block_size", 1)))
  max_len = min(limit, _round_up(longest + max_new_tokens - 1, bucket))
  sampling = (jnp.float32(temperature), jnp.float32(top_p))
  key = jax.random.key(seed)
  first, cache = _prefill_step(*nnx.split(model), model.check_tokens(padded), lengths, jax.random.fold_in(key, 0),
                               *sampling, max_len=max_len)
  stop_ids = sorted({int(t) for t in stop_tokens})
  stop = np.full(_round_up(max(1, len(stop_ids)), 8), -1, np.int32)  # padded with -1: fewer compilations
  stop[:len(stop_ids)] = stop_ids
  # Decode steps never call the model's policy, so a dense copy shares one compiled loop across policies.
  decoder = nnx.split(model.with_attention(DenseAttention()))
  out, filled, _ = _decode_loop(*decoder, cache, first, stop, jnp.int32(max_new_tokens), key, *sampling,
                                decode_policy)
  return [_until_stop(row, stop) for row in np.asarray(out)[:, :int(filled)]]


def check_arguments(max_new_tokens: Any, *, temperature: float, top_p: float) -> None:
  """Raises UserInputError unless max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1."""
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise UserInputError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise UserInputError(f"temperature must be >= 0 (0 is greedy); got {temperature}")
  if not 0 < top_p <= 1:
    raise UserInputError(f"top_p must lie in (0, 1]; got {top_p}")


def _prompts(tokens: Any) -> list[list[int]]:
  """The prompts as lists of ints; raises UserInputError for no prompt or an empty one."""
  if isinstance(tokens, (np.ndarray, jax.Array)):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be int [batch, seq] or a list of int lists; got {tokens.dtype}{tokens.shape}")
    tokens = np.asarray(tokens).tolist()
  prompts = [[int(t) for t in prompt] for prompt in tokens]
  if not prompts or not all(prompts):
    raise UserInputError("the prompt is empty; generation needs at least one token to continue"
                         if len(prompts) <= 1 else "every prompt needs at least one token; one is empty")
  return prompts


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _until_stop(tokens: np.ndarray, stop: np.ndarray) -> list[int]:
  """tokens up to and including the first stop token."""
  hits = np.flatnonzero(np.isin(tokens, stop))
  return tokens[: hits[0] + 1 if hits.size else len(tokens)].tolist()
