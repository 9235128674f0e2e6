"""Sliding-window perplexity, the Hugging Face recipe, batched and jitted for any attention policy.

Windows of `context` tokens start every `stride` tokens. The last window ends at the end of the text,
so it may be shorter. Each window scores only the tokens that the previous window did not score. So
every token after the first is scored once, by the first window that holds it and at least one token
before it. The first token of the text is never scored. With `stride == context` the windows do not
overlap, and the first token of each window is left unscored, as in the Hugging Face recipe.
Windows are padded to one fixed shape [batch_size, window_len], so one compiled program serves the
whole text, and the padding is masked out of the loss. The model is only called as
`model(tokens) -> logits`, which is why dense, SpargeAttn and baseline policies are measured the same way.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm


class Window(NamedTuple):
  """Tokens [begin, end) go into the model; the tokens at positions [score_from, end) are scored."""

  begin: int
  end: int
  score_from: int


class PerplexityResult(NamedTuple):
  """The outcome of one sliding-window evaluation.

  Attributes:
    ppl: exp(nll_sum / num_scored).
    nll_sum: the sum of -log p(token | window prefix) over the scored tokens, in nats. Each token's
      value is float32; they are added exactly with `math.fsum`.
    num_scored: how many tokens were scored.
    tokens_per_second: real (non-padding) input tokens that went through the model per second of
      wall time. The first batch is left out when there are more batches, because it includes compilation.
    windows: how many windows were evaluated (windows that score nothing are skipped).
  """

  ppl: float
  nll_sum: float
  num_scored: int
  tokens_per_second: float
  windows: int


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
  """The recipe's windows over a text of `num_tokens` tokens, skipping windows that score nothing."""
  windows = []
  previous_end = 0
  for begin in range(0, num_tokens, stride):
    end = min(begin + context, num_tokens)
    # A token needs one token before it in the window; tokens the previous window scored are skipped.
    score_from = max(previous_end, begin + 1)
    if score_from < end:
      windows.append(Window(begin, end, score_from))
    previous_end = end
    if end == num_tokens:
      break
  return windows


def corpus_token_ids(tokenizer: Any, text: str, *, add_bos: bool = False) -> np.ndarray:
  """Encodes one evaluation text as int32 [num_tokens]. With `add_bos`, it prepends `tokenizer.bos_id` once.

  The Hugging Face recipe tokenizes the whole joined split in one call, so Llama-2's tokenizer adds a
  single BOS at the start of the text. SmolLM2's tokenizer adds none.
  """
  ids = list(tokenizer.encode(text))
  if add_bos:
    if tokenizer.bos_id is None:
      raise ValueError(f"add_bos=True but the tokenizer has no BOS token: {tokenizer!r}")
    ids = [tokenizer.bos_id, *ids]
  return np.asarray(ids, dtype=np.int32)


def perplexity(model: Any, token_ids: Any, context: int = 1024, stride: int = 512, *, batch_size: int = 4,
               max_tokens: int | None = None, progress: bool = True) -> float:
  """Sliding-window perplexity of `model` on `token_ids`. See `perplexity_with_stats`."""
  return perplexity_with_stats(model, token_ids, context, stride, batch_size=batch_size, max_tokens=max_tokens,
                               progress=progress).ppl


def perplexity_with_stats(model: Any, token_ids: Any, context: int = 1024, stride: int = 512, *,
                          batch_size: int = 4, max_tokens: int | None = None,
                          progress: bool = True) -> PerplexityResult:
  """Sliding-window perplexity together with the numbers behind it and the throughput.

  Args:
    model: a callable `model(tokens)`. It maps int32 [batch, seq] to float [batch, seq, vocab] logits.
      It has a `.config` with `max_position_embeddings`, and optionally `vocab_size`. Flax NNX modules
      are passed into the jitted step as state, and other callables are closed over.
    token_ids: integer ids, [num_tokens], with num_tokens >= 2.
    context: window length in tokens, from 2 to `model.config.max_position_embeddings`.
    stride: how many tokens each window starts after the previous one, from 1 to `context`.
    batch_size: windows per model call. The last batch is padded with empty windows.
    max_tokens: when set, only the first `max_tokens` ids are evaluated.
    progress: show a tqdm bar with the running tokens/s.

  Returns:
    A PerplexityResult.
  """
  token_ids = _check_token_ids(token_ids, max_tokens, getattr(model.config, "vocab_size", None))
  _check_window_args(context, stride, batch_size, model.config.max_position_embeddings)
  windows = sliding_windows(len(token_ids), context, stride)
  window_len = min(context, len(token_ids))
  score_batch = batch_scorer(model)
  scored_nll: list[np.ndarray] = []
  timed_tokens, timed_seconds, all_seconds = 0, 0.0, 0.0
  batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
  with tqdm.tqdm(total=len(windows), unit="window", desc=f"perplexity ctx={context}", disable=not progress) as bar:
    for index, batch in enumerate(batches):
      tokens, targets, weights = _assemble_batch(token_ids, batch, batch_size, window_len)
      start = time.perf_counter()
      nll = np.asarray(score_batch(tokens, targets, weights))  # Blocks until the batch is done.
      seconds = time.perf_counter() - start
      scored_nll.append(nll[weights > 0])
      real_tokens = sum(window.end - window.begin for window in batch)
      all_seconds += seconds
      if index > 0 or len(batches) == 1:  # The first of several batches pays for compilation.
        timed_tokens, timed_seconds = timed_tokens + real_tokens, timed_seconds + seconds
      bar.update(len(batch))
      bar.set_postfix(tokens_per_s=f"{timed_tokens / max(timed_seconds, 1e-9):,.0f}")
  values = np.concatenate(scored_nll).astype(np.float64)
  nll_sum = math.fsum(values)
  return PerplexityResult(ppl=math.exp(nll_sum / len(values)), nll_sum=nll_sum, num_scored=len(values),
                          tokens_per_second=timed_tokens / max(timed_seconds, 1e-9), windows=len(windows))


def _check_token_ids(token_ids: Any, max_tokens: int | None, vocab_size: int | None) -> np.ndarray:
  ids = np.asarray(token_ids)
  if ids.ndim != 1:
    raise ValueError(f"token_ids must be one sequence [num_tokens]; got shape {ids.shape}")
  if ids.size and not (np.issubdtype(ids.dtype, np.integer) and ids.dtype != np.bool_):
    raise ValueError(f"token_ids must be integers; got dtype {ids.dtype}")
  if max_tokens is not None:
    if max_tokens < 2:
      raise ValueError(f"max_tokens={max_tokens} must be None or >= 2")
    ids = ids[:max_tokens]
  if ids.size < 2:
    raise ValueError(f"token_ids has {ids.size} tokens; perplexity needs at least 2")
  upper = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
  if ids.min() < 0 or ids.max() >= upper:
    raise ValueError(f"token_ids must lie in [0, {upper}); got ids from {ids.min()} to {ids.max()}")
  return ids.astype(np.int32)


def _check_window_args(context: int, stride: int, batch_size: int, max_positions: int) -> None:
  if context < 2:
    raise ValueError(f"context={context} must be >= 2 (a window needs a token to predict from)")
  if context > max_positions:
    raise ValueError(f"context={context} exceeds the model's max_position_embeddings={max_positions}")
  if not 0 < stride <= context:
    raise ValueError(f"stride={stride} must be in [1, context={context}]")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")


def _assemble_batch(token_ids: np.ndarray, windows: Sequence[Window], batch_size: int,
                    window_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Padded model inputs for one batch of windows.

  Returns:
    tokens: int32 [batch_size, window_len], the window's tokens and then zeros.
    targets: int32 [batch_size, window_len]. targets[b, j] is the token after position j.
    weights: float32 [batch_size, window_len], 1 where position j's prediction is scored.
  """
  tokens = np.zeros((batch_size, window_len), np.int32)
  targets = np.zeros((batch_size, window_len), np.int32)
  weights = np.zeros((batch_size, window_len), np.float32)
  for row, window in enumerate(windows):
    length = window.end - window.begin
    tokens[row, :length] = token_ids[window.begin:window.end]
    targets[row, :length - 1] = token_ids[window.begin + 1:window.end]
    # Position j predicts token begin + j + 1, so the scored tokens [score_from, end) are the
    # predictions at [score_from - begin - 1, length - 1).
    weights[row, window.score_from - window.begin - 1:length - 1] = 1.0
  return tokens, targets, weights


def token_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """-log_softmax(logits)[target] in float32, set to 0 where the weight is 0.

  logits: [batch, seq, vocab]; targets: int [batch, seq]; weights: [batch, seq] -> [batch, seq].
  It uses the same arithmetic as `jax.nn.log_softmax`, shifted logits minus their log-sum-exp, but it
  reads only the target entry, so no second [batch, seq, vocab] array is kept.
  """
  if logits.shape[:2] != targets.shape:
    raise ValueError(f"model returned logits of shape {logits.shape} for tokens of shape {targets.shape}")
  logits = logits.astype(jnp.float32)
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  shifted_logsumexp = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
  target_shifted = jnp.take_along_axis(shifted, targets[..., None], axis=-1)[..., 0]
  return jnp.where(weights > 0, shifted_logsumexp - target_shifted, 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _module_batch_nll(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, targets: jax.Array,
                      weights: jax.Array) -> jax.Array:
  return token_nll(nnx.merge(graphdef, state)(tokens), targets, weights)


def batch_scorer(model: Any) -> Callable[[np.ndarray, np.ndarray, np.ndarray], jax.Array]:
  """A jitted (tokens, targets, weights) -> per-token nll [batch, seq] for this model.

  An NNX module's weights enter as traced state, so a 7B model is not baked into the program as
  constants. Any other callable is closed over.
  """
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    return functools.partial(_module_batch_nll, graphdef, state)
  return jax.jit(lambda tokens, targets, weights: token_nll(model(tokens), targets, weights))
