"""Flax NNX Llama decoder (Llama-2, SmolLM2) with attention injected through one policy seam.

Numerics follow Hugging Face's `LlamaForCausalLM`: pre-norm decoder layers, RMSNorm computed in float32,
rotate-half RoPE, SwiGLU MLP, grouped-query attention whose softmax runs in float32, and float32 logits.
Weights and the residual stream are kept in `config.param_dtype` (bfloat16 for real checkpoints). Every
layer calls `policy(q, k, v, layer=i)`, so dense, SpargeAttn and baseline attention share one forward.
The cached forward (`prefill`, `decode`; `afbs_jax.model.cache`) runs the same layer code with an attention
step that also writes the KV cache: prefill calls the policy, decode steps attend densely to the cache
unless given a decode policy (`afbs_jax.attention.decode`).
Einsum letters: B batch, T query len, S key len, N heads, K kv heads, H head dim, D hidden, V vocab.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.model import cache as cache_lib
from afbs_jax.model.attention import DenseAttention
from afbs_jax.model.config import LlamaConfig

Policy = Any  # Callable (q, k, v, *, layer[, q_positions]) -> out; see afbs_jax.attention.policy.


def _policy_attribute(policy: Policy) -> Policy:
  """Wraps a policy for storage on the model.

  A pytree policy with array leaves (per-head thresholds, `afbs_jax.attention.TunedAttention`) is data:
  its leaves are traced under jit, so new threshold values reuse the compiled forward. Any other callable,
  and a pytree with no leaves, is static: hashed into the compiled program, so each new (unequal) object
  compiles once.
  """
  leaves = jax.tree.leaves(policy)
  # A pytree without leaves (a baseline whose whole configuration is static) must be static too: as data
  # it would flatten to nothing, and its configuration would not reach the compiled forward's cache key.
  if not leaves or (len(leaves) == 1 and leaves[0] is policy):
    return nnx.static(policy)
  non_arrays = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, (jax.Array, np.ndarray))]
  if non_arrays:
    raise ValueError(f"a pytree policy may only have array leaves; {policy!r} has {non_arrays}")
  return nnx.data(policy)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm; statistics and scaling in float32, output in the input dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., dim] -> [..., dim]."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class RotaryEmbedding(nnx.Module):
  """Rotary position embedding in Hugging Face's rotate-half layout (pairs dims i and i + head_dim/2)."""

  def __init__(self, head_dim: int, *, theta: float):
    if head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
    self.head_dim = head_dim
    self.theta = theta

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x: [batch, T, heads, head_dim], positions: int [T] or [batch, T] -> [batch, T, heads, head_dim]."""
    exponents = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
    inv_freq = 1.0 / (self.theta**exponents)  # [head_dim / 2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(batch,) T, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [(batch,) T, 1, head_dim]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _linear(in_features: int, out_features: int, config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Linear:
  dtype = jnp.dtype(config.param_dtype)
  return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate_proj = _linear(config.hidden_size, config.intermediate_size, config, rngs)
    self.up_proj = _linear(config.hidden_size, config.intermediate_size, config, rngs)
    self.down_proj = _linear(config.intermediate_size, config.hidden_size, config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, T, hidden] -> [batch, T, hidden]."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nnx.Module):
  """Grouped-query self-attention block: projections and RoPE here, the attention itself in the policy."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.head_dim
    self.q_proj = _linear(config.hidden_size, config.num_heads * config.head_dim, config, rngs)
    self.k_proj = _linear(config.hidden_size, config.num_kv_heads * config.head_dim, config, rngs)
    self.v_proj = _linear(config.hidden_size, config.num_kv_heads * config.head_dim, config, rngs)
    self.o_proj = _linear(config.num_heads * config.head_dim, config.hidden_size, config, rngs)
    self.rope = RotaryEmbedding(config.head_dim, theta=config.rope_theta)

  def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [batch, T, hidden] -> q [batch, T, heads, head_dim], k, v [batch, T, kv_heads, head_dim].

    q and k are post-RoPE; K/V keep kv_heads heads (never repeated to the query head count).
    """
    batch, seq, _ = x.shape
    q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    return self.rope(q, positions), self.rope(k, positions), v

  def output(self, attended: jax.Array) -> jax.Array:
    """attended: [batch, T, heads, head_dim] -> [batch, T, hidden]."""
    batch, seq, _, _ = attended.shape
    return self.o_proj(attended.reshape(batch, seq, self.num_heads * self.head_dim))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.param_dtype)
    self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, *, policy: Policy, layer: int) -> jax.Array:
    """x: [batch, T, hidden] -> [batch, T, hidden]."""
    return self.forward_with_qkv(x, positions, policy=policy, layer=layer)[-1]

  def forward_with_qkv(self, x: jax.Array, positions: jax.Array, *, policy: Policy, layer: int):
    """The layer step that also returns its attention inputs: (q, k, v, next_x); see Attention.qkv."""
    (q, k, v), x = self.forward_with(x, positions, lambda q, k, v: (policy(q, k, v, layer=layer), (q, k, v)))
    return q, k, v, x

  def forward_with(self, x: jax.Array, positions: jax.Array, attend: Any) -> tuple[Any, jax.Array]:
    """The layer step around any attention: `attend(q, k, v) -> (out, aux)`; returns (aux, next_x).

    positions: int [T] or [batch, T]. The plain forward passes the policy; the cached forward passes a
    step that also writes the KV cache (`afbs_jax.model.cache`), so both run this one block.
    """
    q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
    attended, aux = attend(q, k, v)
    h = x + self.self_attn.output(attended.astype(x.dtype))
    return aux, h + self.mlp(self.post_attention_layernorm(h))


class Llama(nnx.Module):
  """Llama causal LM. `model(tokens)` maps int [batch, seq] tokens to float32 [batch, seq, vocab] logits;
  `prefill` and `decode` do the same through a KV cache (`afbs_jax.model.generation` builds on them)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, attention: Policy | None = None):
    dtype = jnp.dtype(config.param_dtype)
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                  rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
    self.lm_head = None if config.tie_word_embeddings else nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
    self.attention = _policy_attribute(attention if attention is not None else DenseAttention())

  def with_attention(self, policy: Policy) -> Llama:
    """Returns a model sharing this model's weights whose layers call `policy(q, k, v, layer=i)`."""
    if not callable(policy):
      raise ValueError(f"policy must be callable (q, k, v, *, layer) -> out; got {policy!r}")
    shared = copy.copy(self)  # Shallow: submodules, hence parameters, are the same objects.
    shared.attention = _policy_attribute(policy)
    return shared

  def check_tokens(self, tokens: Any) -> jax.Array:
    """Validates tokens (numpy or jax int [batch, seq]) and returns them as an int32 jax array."""
    shape = np.shape(tokens)
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [batch, seq]; got dtype {dtype}")
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
      raise ValueError(f"tokens must have shape [batch, seq] with batch, seq >= 1; got {shape}")
    if shape[1] > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {shape[1]} exceeds the context of {self.config.name}: "
                       f"max_position_embeddings={self.config.max_position_embeddings}")
    self._check_token_range(tokens)
    return jnp.asarray(tokens, dtype=jnp.int32)

  def _check_token_range(self, tokens: Any) -> None:
    """Out-of-range ids would silently read a clamped embedding row; traced tokens cannot be checked."""
    try:
      low, high = int(np.min(tokens)), int(np.max(tokens))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return
    if low < 0 or high >= self.config.vocab_size:
      raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}); got ids in "
                       f"[{low}, {high}]")

  def __call__(self, tokens: Any) -> jax.Array:
    """tokens: int [batch, seq] (numpy or jax) -> float32 logits [batch, seq, vocab]; jitted."""
    tokens = self.check_tokens(tokens)
    graphdef, state = nnx.split(self)
    return jitted_forward(graphdef, state, tokens)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32 [batch, seq] -> [batch, seq, hidden] in param dtype."""
    return self.embed_tokens(tokens)

  def logits(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, hidden] residual stream -> float32 [batch, seq, vocab] (after the final norm)."""
    head = self.embed_tokens.embedding if self.lm_head is None else self.lm_head
    return jnp.einsum("BTD,VD->BTV", self.norm(x), head[...], preferred_element_type=jnp.float32)

  def apply(self, tokens: jax.Array) -> jax.Array:
    """Un-jitted forward for use inside a caller's transform: int32 [batch, seq] -> f32 [batch, seq, vocab]."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = self.embed(tokens)
    for index, layer in enumerate(self.layers):
      x = layer(x, positions, policy=self.attention, layer=index)
    return self.logits(x)

  def prefill(self, tokens: Any, *, max_len: int, lengths: Any = None,
              key_block_size: int | None = None) -> tuple[jax.Array, cache_lib.KVCache]:
    """Scores right-padded prompts and stores their K/V in a new cache of `max_len` slots; jitted.

    tokens: int [batch, P]; lengths: int [batch], each prompt's length (default P). Returns float32
    logits [batch, P, vocab] (a prompt's next-token logits are at lengths - 1) and the cache, whose
    end_index is `lengths`. The model's policy runs here, sparse or dense, as in `__call__`. With
    `key_block_size` (dividing max_len) the cache also keeps running per-block key sums for a block-sparse
    decode policy of that block size (`afbs_jax.model.cache.with_key_sums`).
    """
    tokens = self.check_tokens(tokens)
    lengths = np.full(tokens.shape[0], tokens.shape[1]) if lengths is None else np.asarray(lengths)
    if lengths.shape != tokens.shape[:1] or lengths.min() < 1 or lengths.max() > tokens.shape[1]:
      raise ValueError(f"lengths must be [batch]={tokens.shape[:1]} in [1, {tokens.shape[1]}]; got {lengths}")
    if not tokens.shape[1] <= max_len <= self.config.max_position_embeddings:
      raise ValueError(f"max_len={max_len} must lie in [prompt length {tokens.shape[1]}, "
                       f"max_position_embeddings={self.config.max_position_embeddings}]")
    if key_block_size is not None and (key_block_size < 1 or max_len % key_block_size):
      raise ValueError(f"key_block_size={key_block_size} must divide max_len={max_len}")
    graphdef, state = nnx.split(self)
    return jitted_prefill(graphdef, state, tokens, jnp.asarray(lengths, jnp.int32), max_len=int(max_len),
                          key_block_size=key_block_size)

  def decode(self, tokens: Any, cache: cache_lib.KVCache, *, decode_policy: Any = None,
             return_stats: bool = False) -> tuple[Any, ...]:
    """Appends a chunk of T >= 1 tokens per sequence to `cache`: (float32 logits [batch, T, vocab], cache).

    Each sequence's chunk sits at positions end_index .. end_index + T - 1, which must stay below
    cache.max_len (checked here; `apply_decode` cannot check it). Attention is dense against the cache
    whatever the model's policy, or `decode_policy.decode(...)` when given (block-sparse decode:
    `afbs_jax.attention.decode.DecodeSparseAttention`); jitted. `return_stats` adds, with a decode
    policy, one `DecodeSparseStats` per layer (kept blocks, decode sparsity; None per layer when dense).
    """
    tokens = self.check_tokens(tokens)
    if tokens.shape[0] != cache.batch or int(np.max(cache.end_index)) + tokens.shape[1] > cache.max_len:
      raise ValueError(f"a chunk of {tokens.shape} tokens does not fit a cache of batch {cache.batch}, "
                       f"max_len={cache.max_len} holding up to {int(np.max(cache.end_index))} tokens")
    graphdef, state = nnx.split(self)
    return jitted_decode(graphdef, state, tokens, cache, decode_policy, return_stats=return_stats)

  def apply_prefill(self, tokens: jax.Array, lengths: jax.Array, max_len: int, *, last_only: bool = False,
                    key_block_size: int | None = None):
    """Un-jitted `prefill` for use inside a caller's transform; with `last_only` the logits are those of
    each prompt's last token only, [batch, 1, vocab] (never materialising [batch, P, vocab])."""
    cache = cache_lib.init_cache(self.config, batch=tokens.shape[0], max_len=max_len)
    x, layers = self._apply_cached(tokens, cache, functools.partial(cache_lib.prefill_attention,
                                                                    policy=self.attention))
    if last_only:
      x = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    cache = cache_lib.KVCache(tuple(layers), lengths.astype(jnp.int32))
    if key_block_size is not None:
      cache = cache_lib.with_key_sums(cache, key_block_size)
    return self.logits(x), cache

  def apply_decode(self, tokens: jax.Array, cache: cache_lib.KVCache, *, decode_policy: Any = None,
                   return_stats: bool = False):
    """Un-jitted `decode` for use inside a caller's transform."""
    x, aux = self._apply_cached(tokens, cache, functools.partial(cache_lib.decode_attention, policy=decode_policy,
                                                                 return_stats=return_stats))
    layers, stats = zip(*aux) if return_stats else (aux, None)
    new_cache = cache_lib.KVCache(tuple(layers), cache.end_index + tokens.shape[1])
    return (self.logits(x), new_cache) + ((tuple(stats),) if return_stats else ())

  def _apply_cached(self, tokens: jax.Array, cache: cache_lib.KVCache, step: Any):
    """The layers with `step(cache, index) -> attend` as their attention; (last hidden states, each
    layer's aux: its new `LayerCache`, with the step's statistics when it returns them)."""
    positions = cache.positions(tokens.shape[1])  # [batch, T]
    x = self.embed(tokens)
    aux = []
    for index, layer in enumerate(self.layers):
      layer_aux, x = layer.forward_with(x, positions, step(cache, index))
      aux.append(layer_aux)
    return x, aux


@functools.partial(jax.jit, static_argnums=0)
def jitted_forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
  """`Llama.apply` on split state: (graphdef, state) = nnx.split(model); recompiles only on new shapes."""
  return nnx.merge(graphdef, state).apply(tokens)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_len", "key_block_size"))
def jitted_prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, lengths: jax.Array, *,
                   max_len: int, key_block_size: int | None = None) -> tuple[jax.Array, cache_lib.KVCache]:
  """`Llama.apply_prefill` on split state."""
  return nnx.merge(graphdef, state).apply_prefill(tokens, lengths, max_len, key_block_size=key_block_size)


@functools.partial(jax.jit, static_argnums=0, static_argnames="return_stats")
def jitted_decode(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, cache: cache_lib.KVCache,
                  decode_policy: Any = None, *, return_stats: bool = False) -> tuple[Any, ...]:
  """`Llama.apply_decode` on split state; `decode_policy` is a pytree (its tables traced) or None."""
  return nnx.merge(graphdef, state).apply_decode(tokens, cache, decode_policy=decode_policy,
                                                 return_stats=return_stats)
