"""Calibration capture: each layer's post-RoPE Q/K/V from a dense forward, one layer at a time.

The tuner calibrates thresholds on real activations. `iter_layer_qkv` runs the dense forward layer by
layer under one jitted layer step (every decoder layer shares a graph definition, so it compiles once)
and yields that layer's q/k/v before moving on, so only one layer's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from afbs_jax.model.attention import DenseAttention
from afbs_jax.model.llama import Llama


@functools.partial(jax.jit, static_argnums=0)
def _layer_step(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array):
  positions = jnp.arange(x.shape[1], dtype=jnp.int32)
  return nnx.merge(graphdef, state).forward_with_qkv(x, positions, policy=DenseAttention(), layer=0)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(tokens)


def iter_layer_qkv(model: Llama, tokens: Any) -> Iterator[tuple[int, jax.Array, jax.Array, jax.Array]]:
  """Yields (layer, q, k, v) for every layer of the dense forward on `tokens`.

  Args:
    model: a Llama; its attention policy is ignored (capture is always dense, as calibration needs).
    tokens: int [batch, seq] (numpy or jax), seq <= max_position_embeddings.

  Yields:
    layer index, q: [batch, seq, heads, head_dim] (post-RoPE), k: [batch, seq, kv_heads, head_dim]
    (post-RoPE), v: [batch, seq, kv_heads, head_dim], all in the model's param dtype.
  """
  tokens = model.check_tokens(tokens)
  x = _embed(*nnx.split(model.embed_tokens), tokens)
  for index, layer in enumerate(model.layers):
    q, k, v, x = _layer_step(*nnx.split(layer), x)
    yield index, q, k, v
