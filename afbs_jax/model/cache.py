"""An explicit, functional KV cache for `Llama`'s cached forward: a pytree passed in and returned.

Layout (gemma's cache, `google-deepmind/gemma`, without the ring buffer): per layer, k and v buffers
[batch, max_len, kv_heads, head_dim] in the model's param dtype, and one `end_index` int32 [batch], the
number of tokens each sequence has written. Prompts are right-padded: slot j of every sequence holds the
token at absolute position j, so RoPE positions are slot indices (`positions`) and no per-slot position
array or padding mask is needed. A query at position p sees slots 0..p (the causal mask), so slots at or
beyond a sequence's `end_index` (its padding, stale values) are never read before a later step overwrites
them. `max_len` is the buffers' static length: one compilation per (batch, max_len).

The two attention steps a layer takes (`prefill_attention`, `decode_attention`) are `attend(q, k, v) ->
(out, new LayerCache)` functions for `DecoderLayer.forward_with`, so the cached forward runs the same
layer code as the plain one. Prefill is an ordinary full-sequence call of the model's policy (a sparse
policy runs here as it does for perplexity); decode steps attend densely against the cache by default, one
sequence at a time under `vmap` (each has its own `q_positions`), or through a decode policy
(`afbs_jax.attention.decode.DecodeSparseAttention`: only the kept key blocks of the cache, whole batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from afbs_jax.attention.dense import DenseAttention

# Decode steps attend densely against the cache whatever the prefill policy, unless given a decode policy.
_DECODE_ATTENTION = DenseAttention()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's keys (post-RoPE) and values: k, v [batch, max_len, kv_heads, head_dim]."""

  k: jax.Array
  v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Every layer's `LayerCache` and the tokens written per sequence, end_index int32 [batch].

  Slot j holds position j (right-padded prompts); the next token of sequence b goes to slot
  end_index[b] at RoPE position end_index[b].
  """

  layers: tuple[LayerCache, ...]
  end_index: jax.Array

  @property
  def batch(self) -> int:
    return self.end_index.shape[0]

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[1]

  def positions(self, length: int) -> jax.Array:
    """int32 [batch, length]: the absolute positions of the next `length` tokens of every sequence."""
    return self.end_index[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def init_cache(config: Any, *, batch: int, max_len: int, dtype: Any = None) -> KVCache:
  """An empty cache for `config` (a LlamaConfig): zero buffers, end_index 0; dtype defaults to param_dtype."""
  if batch < 1 or not 1 <= max_len <= config.max_position_embeddings:
    raise ValueError(f"need batch >= 1 and 1 <= max_len <= max_position_embeddings="
                     f"{config.max_position_embeddings}; got {batch=}, {max_len=}")
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.param_dtype)
  layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))
  return KVCache(layers, jnp.zeros((batch,), jnp.int32))


Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, LayerCache]]


def prefill_attention(cache: KVCache, layer: int, policy: Any) -> Attend:
  """Layer `layer`'s prefill step: `policy` over the whole (right-padded) prompt, K/V stored from slot 0.

  The cache must be empty (end_index 0): prompts start at position 0. The padding's keys land in slots
  past each sequence's length, where no later query looks before they are overwritten.
  """
  layer_cache = cache.layers[layer]

  def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, LayerCache]:
    """q: [batch, T, heads, head_dim], k, v: [batch, T, kv_heads, head_dim] -> (out, new layer cache)."""
    written = LayerCache(*(jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0, 0, 0, 0))
                           for buffer, new in ((layer_cache.k, k), (layer_cache.v, v))))
    return policy(q, k, v, layer=layer), written

  return attend


def decode_attention(cache: KVCache, layer: int, policy: Any = None) -> Attend:
  """Layer `layer`'s decode step: write the chunk's K/V at each sequence's end_index, then attend densely
  to the whole cache with the chunk's absolute positions as `q_positions` (per sequence, under vmap), or,
  given a decode policy, `policy.decode(q, k_cache, v_cache, lengths, layer=layer)` with lengths =
  end_index + T (`afbs_jax.attention.decode`)."""
  layer_cache = cache.layers[layer]

  def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, LayerCache]:
    """q: [batch, T, heads, head_dim], k, v: [batch, T, kv_heads, head_dim] -> (out, new layer cache)."""
    write = jax.vmap(lambda buffer, new, start: jax.lax.dynamic_update_slice(buffer, new, (start, 0, 0)))
    written = LayerCache(write(layer_cache.k, k.astype(layer_cache.k.dtype), cache.end_index),
                         write(layer_cache.v, v.astype(layer_cache.v.dtype), cache.end_index))
    if policy is not None:
      lengths = cache.end_index + q.shape[1]
      out = policy.decode(q, written.k.astype(q.dtype), written.v.astype(q.dtype), lengths, layer=layer)
      return out, written
    q_positions = cache.positions(q.shape[1])  # [batch, T]

    def one_sequence(q, k, v, positions):  # [T, heads, head_dim], [max_len, kv_heads, head_dim]x2, [T]
      return _DECODE_ATTENTION(q[None], k[None].astype(q.dtype), v[None].astype(q.dtype), layer=layer,
                               q_positions=positions)[0]

    return jax.vmap(one_sequence)(q, written.k, written.v, q_positions), written

  return attend
