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

Block-sparse decode scores every cache block by its mean key. Re-pooling the whole cache at every step
reads all of K, which is most of what the sparse step saves, so a cache may keep running per-block key
sums (`LayerCache.key_sums`, f32 [batch, max_len // block, kv_heads, head_dim], 1/block of K's elements;
`with_key_sums` after prefill): each decode write re-sums only the block(s) it touches, from the cache,
in the same pairwise order as a full pooling (`kernels.decode_sparse_reference.update_key_block_sums`),
so the policy gets bit-identical means and selects exactly the same blocks. The counts are not stored:
slot = position, so block j holds clip(end_index − j·block, 0, block) filled slots. A cache has sums
only when asked (`generate` asks when its decode policy reads them): the dense path's cache is unchanged
and pays nothing, and the block size belongs to the decode policy anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from afbs_jax.attention.dense import DenseAttention
from kernels.decode_sparse_reference import block_means, key_block_sums, update_key_block_sums

# Decode steps attend densely against the cache whatever the prefill policy, unless given a decode policy.
_DECODE_ATTENTION = DenseAttention()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's keys (post-RoPE) and values: k, v [batch, max_len, kv_heads, head_dim]; optionally the
  running per-block key sums, key_sums f32 [batch, max_len // block, kv_heads, head_dim] (exact for
  every block below end_index; module docstring)."""

  k: jax.Array
  v: jax.Array
  key_sums: jax.Array | None = None


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

  @property
  def key_block_size(self) -> int | None:
    """Slots per block of the running key sums, or None when the cache keeps none."""
    sums = self.layers[0].key_sums
    return None if sums is None else self.max_len // sums.shape[1]

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


def with_key_sums(cache: KVCache, block_size: int) -> KVCache:
  """`cache` with every layer's running key sums over blocks of `block_size` slots (which must divide
  max_len) computed from its keys at end_index: one pass over K, after prefill."""
  if block_size < 1 or cache.max_len % block_size:
    raise ValueError(f"block_size={block_size} must divide the cache's max_len={cache.max_len}")
  return dataclasses.replace(cache, layers=tuple(
      dataclasses.replace(layer, key_sums=key_block_sums(layer.k, cache.end_index, block_size))
      for layer in cache.layers))


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


def decode_attention(cache: KVCache, layer: int, policy: Any = None, *, return_stats: bool = False) -> Attend:
  """Layer `layer`'s decode step: write the chunk's K/V at each sequence's end_index (and re-sum the
  touched blocks when the cache keeps key sums), then attend densely to the whole cache with the chunk's
  absolute positions as `q_positions` (per sequence, under vmap), or, given a decode policy,
  `policy.decode(q, k_cache, v_cache, lengths, layer=layer)` with lengths = end_index + T
  (`afbs_jax.attention.decode`), plus `key_means=` the block means when the cache keeps sums (the
  policy's block_size must then be the sums' block). With `return_stats` the step's aux is (new layer
  cache, the policy's `DecodeSparseStats`, or None when dense)."""
  layer_cache = cache.layers[layer]
  block_size = cache.key_block_size
  if policy is not None and block_size is not None and policy.block_size != block_size:
    raise ValueError(f"the decode policy's block_size={policy.block_size} differs from the block of the "
                     f"cache's key sums ({block_size}); build the cache with the policy's block size")

  def attend(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, Any]:
    """q: [batch, T, heads, head_dim], k, v: [batch, T, kv_heads, head_dim] -> (out, new layer cache)."""
    write = jax.vmap(lambda buffer, new, start: jax.lax.dynamic_update_slice(buffer, new, (start, 0, 0)))
    written = LayerCache(write(layer_cache.k, k.astype(layer_cache.k.dtype), cache.end_index),
                         write(layer_cache.v, v.astype(layer_cache.v.dtype), cache.end_index))
    lengths = cache.end_index + q.shape[1]
    means = {}
    if block_size is not None:  # re-sum the touched blocks; the policy reads their means, not all of K
      sums = update_key_block_sums(layer_cache.key_sums, written.k, cache.end_index, lengths, block_size,
                                   q.shape[1])
      written = dataclasses.replace(written, key_sums=sums)
      means = {"key_means": block_means(sums, lengths, block_size)}
    if policy is not None:
      k_cache, v_cache = written.k.astype(q.dtype), written.v.astype(q.dtype)
      if return_stats:
        out, stats = policy.decode_with_stats(q, k_cache, v_cache, lengths, layer=layer, **means)
        return out, (written, stats)
      return policy.decode(q, k_cache, v_cache, lengths, layer=layer, **means), written
    out = dense_decode_attention(q, written.k, written.v, cache.positions(q.shape[1]), layer=layer)
    return out, ((written, None) if return_stats else written)

  return attend


def dense_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_positions: jax.Array, *,
                           layer: int = 0) -> jax.Array:
  """The dense decode step: q [batch, T, heads, head_dim] at q_positions int [batch, T] against the whole
  cache [batch, max_len, kv_heads, head_dim] (causal by position), one sequence at a time under vmap."""

  def one_sequence(q, k, v, positions):  # [T, heads, head_dim], [max_len, kv_heads, head_dim]x2, [T]
    return _DECODE_ATTENTION(q[None], k[None].astype(q.dtype), v[None].astype(q.dtype), layer=layer,
                             q_positions=positions)[0]

  return jax.vmap(one_sequence)(q, k_cache, v_cache, q_positions)
