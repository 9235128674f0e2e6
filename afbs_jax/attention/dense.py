"""Dense attention, the policy every sparse method is compared with."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afbs_jax.attention.policy import check_q_positions, check_qkv


@jax.tree_util.register_pytree_node_class
class DenseAttention:
  """Exact causal attention through `jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU for
  bf16/f16 inputs, XLA otherwise. Both take K/V with fewer heads than Q natively, so GQA never repeats K/V
  in memory. With `q_positions` (a decode step against a longer cache) the causal mask is explicit."""

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int,
               q_positions: jax.Array | None = None) -> jax.Array:
    del layer  # Dense attention is the same in every layer.
    check_qkv(q, k, v)
    if q_positions is not None:
      positions = check_q_positions(q_positions, q.shape[1])
      visible = jnp.arange(k.shape[1])[None, :] <= positions[:, None]  # [T, S]
      return jax.nn.dot_product_attention(q, k, v, mask=visible[None, None])
    # `implementation=None` always means XLA, which materialises [batch, heads, T, S] scores; cuDNN's
    # flash kernel does not, but accepts only half-precision inputs and some shapes. It rejects the rest
    # while tracing, so falling back there costs nothing at run time.
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
      try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      except (ValueError, NotImplementedError, RuntimeError):
        pass
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int) -> tuple[jax.Array, jax.Array]:
    """`self(q, k, v, layer=layer)` and its sparsity, 0 for every [batch, heads]."""
    return self(q, k, v, layer=layer), jnp.zeros((q.shape[0], q.shape[2]), jnp.float32)

  # Every DenseAttention is the same policy: equal and hashed alike, so a model compiles it once.
  def __eq__(self, other: object) -> bool:
    return type(other) is DenseAttention

  def __hash__(self) -> int:
    return hash(DenseAttention)

  def tree_flatten(self):
    return (), None

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    del aux_data, children
    return cls()

  def __repr__(self) -> str:
    return "DenseAttention()"
