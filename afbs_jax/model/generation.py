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

A decode policy with `cached_means` (the default of `DecodeSparseAttention`) gets a cache that keeps
running per-block key sums (`afbs_jax.model.cache`), so its block scores never re-read the whole cache;
the dense path's cache keeps none. `return_stats=True` also reports the measured decode sparsity
(`GenerationStats`) through a second compilation of the loop that accumulates each layer's kept-block
statistics; the default loop computes none. `prefill_prompts` and `decode_from_cache` are generate's two
halves, for callers that time or repeat the decode loop on one prefilled cache (`benchmarks.decode_bench`).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class GenerationStats:
  """What the decode loop of one generation did.

  Attributes:
    decode_steps: iterations of the decode loop (each feeds one token per sequence back).
    sequence_steps: (step, sequence) pairs whose sequence was still generating; a finished sequence's
      remaining steps are not counted.
    layer_sparsity: per layer, the decode sparsity (1 − kept / valid cache blocks) averaged over the
      counted (step, sequence) pairs and the query heads; 0 for dense decode (every block is read).
  """

  decode_steps: int
  sequence_steps: int
  layer_sparsity: tuple[float, ...]

  @property
  def decode_sparsity(self) -> float:
    """The mean over layers (every layer has the same number of heads)."""
    return float(np.mean(self.layer_sparsity))

  @property
  def kept_fraction(self) -> float:
    return 1.0 - self.decode_sparsity


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


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_len", "key_block_size"))
def _prefill_step(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array,
                  key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, max_len: int,
                  key_block_size: int | None):
  """Prefill, then the first new token of every sequence (from its logits at lengths - 1)."""
  logits, cache = nnx.merge(graphdef, state).apply_prefill(tokens, lengths, max_len, last_only=True,
                                                           key_block_size=key_block_size)
  return sample_next(logits[:, 0], key, temperature, top_p), cache


@functools.partial(jax.jit, static_argnums=0, static_argnames="return_stats", donate_argnames="cache")
def _decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: Any, first: jax.Array, stop: jax.Array,
                 max_new_tokens: jax.Array, key: jax.Array, temperature: jax.Array,
                 top_p: jax.Array, decode_policy: Any = None, *, return_stats: bool = False) -> tuple[Any, ...]:
  """Decodes from the first new tokens int32 [batch] until every sequence has produced one of `stop` or
  `max_new_tokens` are out; returns (tokens int32 [batch, cache.max_len], the number of columns filled,
  the cache: returned so that the donated input's buffers hold it, with no second copy, and the
  statistics: (f32 [layers] decode sparsity summed over counted (step, sequence) pairs and heads, int32
  counted pairs), both 0 unless `return_stats` with a decode policy)."""
  model = nnx.merge(graphdef, state)
  out = jnp.zeros((first.shape[0], cache.max_len), jnp.int32).at[:, 0].set(first)

  def unfinished(carry):
    step, _, done, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def decode(carry):
    step, tokens, done, cache, out, (sparsity, counted) = carry
    if return_stats:
      logits, cache, stats = model.apply_decode(tokens[:, None], cache, decode_policy=decode_policy,
                                                return_stats=True)
      active = ~done  # [batch]: a sequence that has stopped no longer counts
      if decode_policy is not None:
        sparsity += jnp.stack([jnp.sum(jnp.where(active[:, None], layer.sparsity, 0.0)) for layer in stats])
      counted += jnp.sum(active, dtype=jnp.int32)
    else:
      logits, cache = model.apply_decode(tokens[:, None], cache, decode_policy=decode_policy)
    tokens = sample_next(logits[:, -1], jax.random.fold_in(key, step), temperature, top_p)
    return step + 1, tokens, done | jnp.isin(tokens, stop), cache, out.at[:, step].set(tokens), (sparsity, counted)

  totals = (jnp.zeros((len(cache.layers),), jnp.float32), jnp.int32(0))
  step, _, _, cache, out, totals = jax.lax.while_loop(
      unfinished, decode, (jnp.int32(1), first, jnp.isin(first, stop), cache, out, totals))
  return out, step, cache, totals


def generate(model: Any, tokens: Any, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), seed: int = 0, decode_policy: Any = None,
             return_stats: bool = False, pad_to: int | None = None
             ) -> list[list[int]] | tuple[list[list[int]], GenerationStats]:
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
      block_size must then divide), and keeps running block key sums when the policy's `cached_means`.
    return_stats: also return `GenerationStats` (the measured decode sparsity); compiles a second loop.
    pad_to: right-pad the batch to at least this many positions (None: to its longest prompt). The
      prefill compiles once per padded shape, so callers that generate for many batches of slightly
      different lengths (task evaluation) pass their longest prompt's length and compile once.

  Returns:
    one list of new token ids per prompt, and the stats if asked.

  Raises:
    UserInputError: an empty prompt, max_new_tokens < 1, a prompt that with max_new_tokens exceeds the
      context, temperature < 0 or top_p outside (0, 1].
  """
  first, cache = prefill_prompts(model, tokens, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 decode_policy=decode_policy, pad_to=pad_to)
  new, _, *stats = decode_from_cache(model, cache, first, max_new_tokens, temperature=temperature, top_p=top_p,
                                     stop_tokens=stop_tokens, seed=seed, decode_policy=decode_policy,
                                     return_stats=return_stats)
  return (new, *stats) if return_stats else new


def prefill_prompts(model: Any, tokens: Any, max_new_tokens: int, *, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, decode_policy: Any = None,
                    pad_to: int | None = None) -> tuple[jax.Array, Any]:
  """`generate`'s first half (same arguments): the right-padded prefill into a cache sized for
  `max_new_tokens` more tokens; returns (the first new token of every prompt, int32 [batch], the cache)."""
  check_arguments(max_new_tokens, temperature=temperature, top_p=top_p)
  prompts = _prompts(tokens)
  limit = model.config.max_position_embeddings
  longest = max(len(prompt) for prompt in prompts)
  if longest + max_new_tokens > limit:
    raise UserInputError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                         f"{model.config.name}'s context of {limit} tokens")
  if pad_to is not None:
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to + max_new_tokens > limit:
      raise UserInputError(f"pad_to must be an integer that with max_new_tokens={max_new_tokens} fits "
                           f"{model.config.name}'s context of {limit} tokens; got {pad_to!r}")
    longest = max(longest, pad_to)
  padded = np.zeros((len(prompts), longest), np.int32)  # right-padded
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt)] = prompt
  lengths = jnp.asarray([len(prompt) for prompt in prompts], jnp.int32)
  # The last new token is never fed back, so the cache holds longest + max_new_tokens - 1 positions; a
  # decode policy's cache blocks must tile it.
  block_size = int(getattr(decode_policy, "block_size", 1))
  max_len = min(limit, _round_up(longest + max_new_tokens - 1, math.lcm(_CACHE_BUCKET, block_size)))
  key_block_size = block_size if getattr(decode_policy, "cached_means", False) else None
  return _prefill_step(*nnx.split(model), model.check_tokens(padded), lengths,
                       jax.random.fold_in(jax.random.key(seed), 0), jnp.float32(temperature), jnp.float32(top_p),
                       max_len=max_len, key_block_size=key_block_size)


def decode_from_cache(model: Any, cache: Any, first: jax.Array, max_new_tokens: int, *,
                      temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
                      seed: int = 0, decode_policy: Any = None,
                      return_stats: bool = False) -> tuple[Any, ...]:
  """`generate`'s second half: the decode loop from `prefill_prompts`' (first, cache), same arguments.

  The cache is donated (its buffers are reused; do not read it afterwards): returns (the new tokens of
  every sequence, first included, as `generate` does; the cache after the loop, which a caller may feed
  back with its end_index reset to repeat the loop; and the `GenerationStats` if asked).
  """
  stop_ids = sorted({int(t) for t in stop_tokens})
  stop = np.full(_round_up(max(1, len(stop_ids)), 8), -1, np.int32)  # padded with -1: fewer compilations
  stop[:len(stop_ids)] = stop_ids
  # Decode steps never call the model's policy, so a dense copy shares one compiled loop across policies.
  decoder = nnx.split(model.with_attention(DenseAttention()))
  out, filled, cache, (sparsity, counted) = _decode_loop(
      *decoder, cache, first, stop, jnp.int32(max_new_tokens), jax.random.key(seed), jnp.float32(temperature),
      jnp.float32(top_p), decode_policy, return_stats=return_stats)
  filled = int(filled)
  new = [_until_stop(row, stop) for row in np.asarray(out)[:, :filled]]
  if not return_stats:
    return new, cache
  counted = int(counted)
  per_layer = np.asarray(sparsity) / max(counted, 1) / model.config.num_heads
  stats = GenerationStats(decode_steps=filled - 1, sequence_steps=counted,
                          layer_sparsity=tuple(float(x) for x in per_layer))
  return new, cache, stats


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
