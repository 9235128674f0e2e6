"""Dense attention, the policy every sparse method is compared with, under the seam's precision policy.

`dense_attention` is exact attention in XLA that follows the precision policy of
`afbs_jax.attention.policy` (logits, softmax and the P·V accumulation in f32, output in the input dtype),
so with every block kept a block-sparse policy on the jnp reference backend reproduces it to f32
rounding. `DenseAttention` is the policy: cuDNN's fused kernel on GPU for bf16/f16 inputs, which already
takes bf16 in, runs the softmax and both accumulations in f32 and rounds only P to bf16 for the P·V
product, as FlashAttention does (on an H200 its error against the f32 reference lies between that of f32
P and of bf16 P with f32 accumulation, far below bf16 accumulation), and `dense_attention` everywhere else.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from afbs_jax.attention.policy import check_q_positions, check_qkv

_HIGHEST = jax.lax.Precision.HIGHEST


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_positions: jax.Array | None = None,
                    mask: jax.Array | None = None) -> jax.Array:
  """Exact causal attention with logits, softmax and P·V accumulation in f32; GQA without repeating K/V.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    q_positions: int [T], the queries' absolute positions (key u is visible to query t iff u <=
      q_positions[t]); None is prefill, bottom-right aligned (q_positions[t] = S − T + t), as the kernels.
    mask: optional bool, broadcastable to [batch, heads, T, S], ANDed with the causal mask. A query that
      sees no key outputs 0.

  Returns:
    [batch, T, heads, head_dim] in q.dtype.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  positions = jnp.arange(q_len) + (kv_len - q_len) if q_positions is None else q_positions
  visible = jnp.arange(kv_len)[None, :] <= positions[:, None]                         # [T, S]
  if mask is not None:
    visible = visible & jnp.broadcast_to(mask, (batch, heads, q_len, kv_len)).reshape(
        batch, kv_heads, group, q_len, kv_len)
  # Query head h = kv_head * group + g reads kv head h // group. Products of the input dtype are exact in
  # f32, so q·k sums in f32 from the inputs as they are; P stays f32 and meets V in f32.
  q_groups = q.reshape(batch, q_len, kv_heads, group, head_dim)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_groups, k, preferred_element_type=jnp.float32,
                      precision=_HIGHEST) / math.sqrt(head_dim)                        # [B, K, G, T, S]
  logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - jnp.where(row_max == -jnp.inf, 0.0, row_max))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32), precision=_HIGHEST)
  return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


@jax.tree_util.register_pytree_node_class
class DenseAttention:
  """Exact causal attention: cuDNN's fused kernel on GPU for bf16/f16 prefill, `dense_attention` (XLA,
  f32 softmax and accumulation) otherwise. Both take K/V with fewer heads than Q natively, so GQA never
  repeats K/V in memory. With `q_positions` (a decode step against a longer cache) the causal mask is
  explicit."""

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int,
               q_positions: jax.Array | None = None) -> jax.Array:
    del layer  # Dense attention is the same in every layer.
    check_qkv(q, k, v)
    if q_positions is not None:
      return dense_attention(q, k, v, q_positions=check_q_positions(q_positions, q.shape[1]))
    # The XLA path materialises [batch, heads, T, S] scores; cuDNN's flash kernel does not, but accepts
    # only half-precision inputs and some shapes (T == S here, where its top-left causal mask is ours).
    # It rejects the rest while tracing, so falling back there costs nothing at run time.
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[1] == k.shape[1]:
      try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      except (ValueError, NotImplementedError, RuntimeError):
        pass
    return dense_attention(q, k, v)

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
