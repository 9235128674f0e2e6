"""Attention policies: the one seam through which every Llama layer computes causal self-attention.

A policy is a callable `policy(q, k, v, *, layer) -> out` with q: [batch, T, heads, head_dim] (post-RoPE),
k, v: [batch, S, kv_heads, head_dim] and out: [batch, T, heads, head_dim]. Dense attention, SpargeAttn
and every block-mask baseline go through it, so swapping one for another never touches the model.
Policies are JAX pytrees: per-head thresholds are array leaves (changing their values reuses the
compiled forward), block sizes and backends are static fields (changing them recompiles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MaskFn = Callable[[jax.Array, jax.Array, int], jax.Array]


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """Raises a ValueError unless q, k, v have the policy-seam shapes (GQA: heads % kv_heads == 0)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape=}, {k.shape=}, {v.shape=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got {k.shape=}, {v.shape=}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must agree on batch and head_dim; got {q.shape=}, {k.shape=}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


@jax.tree_util.register_pytree_node_class
class DenseAttention:
  """Exact causal attention through `jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU for
  bf16/f16 inputs, XLA otherwise. Both take K/V with fewer heads than Q natively, so GQA never repeats K/V
  in memory."""

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int) -> jax.Array:
    del layer  # Dense attention is the same in every layer.
    check_qkv(q, k, v)
    # `implementation=None` always means XLA, which materialises [batch, heads, T, S] scores; cuDNN's
    # flash kernel does not, but accepts only half-precision inputs and some shapes. It rejects the rest
    # while tracing, so falling back there costs nothing at run time.
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
      try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      except (ValueError, NotImplementedError, RuntimeError):
        pass
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)

  def tree_flatten(self):
    return (), None

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    del aux_data, children
    return cls()

  def __repr__(self) -> str:
    return "DenseAttention()"


def _per_head_table(name: str, value: Any) -> jax.Array:
  table = jnp.asarray(value, dtype=jnp.float32)
  if table.ndim != 2:
    raise ValueError(f"{name} must be a [layers, heads] array; got shape {table.shape}")
  return table


def _check_block(name: str, value: int) -> int:
  if not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int; got {value!r}")
  return int(value)


@jax.tree_util.register_pytree_node_class
class SpargeAttention:
  """SpargeAttn block-sparse attention with per-layer, per-head thresholds.

  Attributes:
    tau: f32 [layers, heads], cumulative-mass threshold of the pooled-score softmax (1 keeps every block).
    theta: f32 [layers, heads], self-similarity threshold (>= 1 marks every block non-similar, i.e. dense).
    lam: f32 [layers, heads], P·V skip threshold (natural-log units, <= 0; -inf never skips).
    block_q, block_k: static block sizes of the mask and kernel.
    backend: static kernel backend name passed to `kernels.sparge` ("auto" picks per platform).
    attention_sink: static; always keep key block 0 (SpargeAttn's tuned path does).
  """

  def __init__(self, tau: Any, theta: Any, lam: Any, *, block_q: int, block_k: int, backend: str = "auto",
               attention_sink: bool = False):
    self.tau = _per_head_table("tau", tau)
    self.theta = _per_head_table("theta", theta)
    self.lam = _per_head_table("lam", lam)
    if not self.tau.shape == self.theta.shape == self.lam.shape:
      raise ValueError(f"tau, theta, lam must share one [layers, heads] shape; got {self.tau.shape}, "
                       f"{self.theta.shape}, {self.lam.shape}")
    self.block_q = _check_block("block_q", block_q)
    self.block_k = _check_block("block_k", block_k)
    self.backend = backend
    self.attention_sink = bool(attention_sink)

  @classmethod
  def constant(cls, num_layers: int, num_heads: int, *, tau: float, theta: float, lam: float = -np.inf,
               **static) -> SpargeAttention:
    """The same (tau, theta, lam) for every layer and head; `static` as in the constructor."""
    return cls(*(np.full((num_layers, num_heads), value, np.float32) for value in (tau, theta, lam)), **static)

  @property
  def num_layers(self) -> int:
    return self.tau.shape[0]

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int) -> jax.Array:
    check_qkv(q, k, v)
    if q.shape[2] != self.tau.shape[1] or not 0 <= layer < self.num_layers:
      raise ValueError(f"SpargeAttention holds [layers, heads]={self.tau.shape}; got layer={layer} with "
                       f"{q.shape[2]} heads")
    from kernels import sparge  # Lazily: the model must not need the kernels to run densely.

    params = sparge.SpargeParams(tau=self.tau[layer], theta=self.theta[layer], lam=self.lam[layer])
    return sparge.sparge_attention(q, k, v, params, causal=True, block_q=self.block_q, block_k=self.block_k,
                                   backend=self.backend, attention_sink=self.attention_sink)

  def tree_flatten(self):
    return (self.tau, self.theta, self.lam), (self.block_q, self.block_k, self.backend, self.attention_sink)

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    # Bypasses __init__: jax unflattens with tracers and placeholder leaves that must not be validated.
    policy = object.__new__(cls)
    policy.tau, policy.theta, policy.lam = children
    policy.block_q, policy.block_k, policy.backend, policy.attention_sink = aux_data
    return policy

  def __repr__(self) -> str:
    return (f"SpargeAttention([layers, heads]={getattr(self.tau, 'shape', '?')}, block_q={self.block_q}, "
            f"block_k={self.block_k}, backend={self.backend!r})")


@jax.tree_util.register_pytree_node_class
class BlockMaskAttention:
  """Block-sparse attention under an externally computed block mask (for baselines).

  `mask_fn(q, k, layer)` returns bool [batch, heads, n_q_blocks, n_k_blocks]; it is static (hashed by
  identity), so one function object compiles once.
  """

  def __init__(self, mask_fn: MaskFn, *, block_q: int, block_k: int, backend: str = "auto"):
    if not callable(mask_fn):
      raise ValueError(f"mask_fn must be callable (q, k, layer) -> bool mask; got {mask_fn!r}")
    self.mask_fn = mask_fn
    self.block_q = _check_block("block_q", block_q)
    self.block_k = _check_block("block_k", block_k)
    self.backend = backend

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int) -> jax.Array:
    check_qkv(q, k, v)
    mask = self.mask_fn(q, k, layer)
    expected = (q.shape[0], q.shape[2], -(-q.shape[1] // self.block_q), -(-k.shape[1] // self.block_k))
    if tuple(mask.shape) != expected:
      raise ValueError(f"mask_fn returned a mask of shape {tuple(mask.shape)} for layer {layer}; expected "
                       f"[batch, heads, n_q_blocks, n_k_blocks]={expected}")
    from kernels import sparge  # Lazily, as in SpargeAttention.

    return sparge.block_sparse_attention(q, k, v, mask, causal=True, block_q=self.block_q,
                                         block_k=self.block_k, backend=self.backend)

  def tree_flatten(self):
    return (), (self.mask_fn, self.block_q, self.block_k, self.backend)

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    del children
    policy = object.__new__(cls)
    policy.mask_fn, policy.block_q, policy.block_k, policy.backend = aux_data
    return policy

  def __repr__(self) -> str:
    return f"BlockMaskAttention({self.mask_fn!r}, block_q={self.block_q}, block_k={self.block_k})"
