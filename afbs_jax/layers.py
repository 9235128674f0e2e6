"""SpargeAttn block-sparse attention as a building block for any Flax NNX model, one layer at a time.

`SparseAttention` is an `nnx.Module` holding one layer's per-head thresholds τ, θ, λ and calling
`kernels.sparge.sparge_attention` on `q: [batch, seq, heads, head_dim]` and `k, v: [batch, seq, kv_heads,
head_dim]`; `SparseAttention.from_tuned(load_tuned(path), layer)` takes them, with the block layout and
the attention sink they were validated with, from an AFBS-BO checkpoint. `sparse_attention` is the same
computation as a plain function. The thresholds are `SparsityThreshold` variables, not `nnx.Param`s: they
enter attention only through comparisons (top-CDF selection, similarity > θ, Δ < λ), so their gradient
is zero wherever it exists, and the tuner validated them against an error band that a training step
would silently leave. Held as variables they still travel with the model's state (`nnx.state`,
checkpoints) and are traced under `nnx.jit`, so new values reuse the compiled step, while `nnx.grad` and
`nnx.Optimizer(..., wrt=nnx.Param)` leave them alone. The precision policy (f32 softmax and accumulation,
output in q.dtype) is the one in `afbs_jax.attention.policy`.
"""

from __future__ import annotations

import math
import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from kernels.block_config import BlockSparseConfig
from kernels.sparge import SpargeParams, SpargeStats, sparge_attention


class SparsityThreshold(nnx.Variable):
  """A per-head sparse-attention threshold: model state that is neither a parameter nor trained."""


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, tau: Any, theta: Any, lam: Any = -math.inf,
                     block_q: int = 64, block_k: int = 64, causal: bool = True, backend: str = "auto",
                     attention_sink: bool = False, sm_scale: float | None = None,
                     return_stats: bool = False) -> jax.Array | tuple[jax.Array, SpargeStats]:
  """SpargeAttn attention with per-head thresholds; the function form of `SparseAttention`.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    tau, theta, lam: f32 [heads] or scalars (see `kernels.sparge.SpargeParams`); may be traced.
    block_q, block_k, causal, backend, attention_sink, sm_scale: as in `kernels.sparge.sparge_attention`.
    return_stats: also return the block density and P·V skips.

  Returns:
    out [batch, T, heads, head_dim] in q.dtype (and SpargeStats if `return_stats`). Differentiable in q, k,
    v; the thresholds get no gradient.
  """
  return sparge_attention(q, k, v, SpargeParams(tau=tau, theta=theta, lam=lam), causal=causal,
                          block_q=block_q, block_k=block_k, backend=backend, attention_sink=attention_sink,
                          sm_scale=sm_scale, return_stats=return_stats)


class SparseAttention(nnx.Module):
  """One attention layer's SpargeAttn thresholds and the call that applies them.

  Attributes:
    tau, theta, lam: SparsityThreshold, f32 [heads] (τ = 1, θ = 1, λ = −∞ keeps every block).
    block_q, block_k, causal, backend, attention_sink: static; changing them recompiles.

  Example (inside a Flax NNX module, after its q/k/v projections and RoPE):
    self.attention = SparseAttention.from_tuned(load_tuned("outputs/smollm2/checkpoint"), layer=3)
    out = self.attention(q, k, v)          # [batch, seq, heads, head_dim]
  """

  def __init__(self, tau: Any, theta: Any, lam: Any = -math.inf, *, block_q: int = 64, block_k: int = 64,
               causal: bool = True, backend: str = "auto", attention_sink: bool = False):
    tables = [jnp.asarray(value, jnp.float32) for value in (tau, theta, lam)]
    heads = max(table.size for table in tables)
    if any(table.ndim > 1 or table.size not in (1, heads) for table in tables):
      raise ValueError("tau, theta and lam must be scalars or [heads] arrays of one length; got shapes "
                       f"{[table.shape for table in tables]}")
    # Validates the block sizes and the backend once, here, with the message every entry point gives.
    blocks = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=causal, backend=backend)
    self.tau, self.theta, self.lam = (SparsityThreshold(jnp.broadcast_to(t, (heads,))) for t in tables)
    self.block_q, self.block_k, self.causal, self.backend = blocks.block_q, blocks.block_k, causal, backend
    self.attention_sink = bool(attention_sink)

  @classmethod
  def keep_all(cls, num_heads: int, **static: Any) -> SparseAttention:
    """Thresholds that compute every causal block (exact attention); `static` as in the constructor."""
    return cls([1.0] * num_heads, [1.0] * num_heads, [-math.inf] * num_heads, **static)

  @classmethod
  def from_tuned(cls, tuned: Any, layer: int, *, backend: str = "auto") -> SparseAttention:
    """Layer `layer` of a SpargeAttn checkpoint (`afbs_jax.checkpoint.TunedParams`), with the block
    layout, causality and attention sink it was tuned and validated with."""
    if tuned.method_name != "sparge":
      raise ValueError(f"SparseAttention runs SpargeAttn; the checkpoint holds method {tuned.method_name!r} "
                       "(use afbs_jax.checkpoint.attention_policy for it)")
    if not 0 <= layer < tuned.num_layers:
      raise ValueError(f"layer={layer} outside the checkpoint's {tuned.num_layers} layers")
    options = dict(tuned.method_options)
    attention_sink = bool(options.pop("attention_sink", False))
    if any(options.values()):  # an option this layer cannot apply would silently change what was validated
      raise ValueError(f"the checkpoint's SpargeAttn options {options} are not supported by SparseAttention "
                       "(use afbs_jax.checkpoint.attention_policy)")
    blocks = tuned.block_config(backend)
    return cls(tuned.tau[layer], tuned.theta[layer], tuned.lam[layer], block_q=blocks.block_q,
               block_k=blocks.block_k, causal=blocks.causal, backend=backend, attention_sink=attention_sink)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, layer: int, *, backend: str = "auto") -> SparseAttention:
    """`from_tuned(load_tuned(path), layer)`; load the checkpoint once yourself for several layers."""
    from afbs_jax import checkpoint  # pylint: disable=g-import-not-at-top  (orbax loads only when asked)
    return cls.from_tuned(checkpoint.load_tuned(path), layer, backend=backend)

  @property
  def num_heads(self) -> int:
    return int(self.tau.shape[0])

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, sm_scale: float | None = None,
               return_stats: bool = False) -> jax.Array | tuple[jax.Array, SpargeStats]:
    """q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim] -> [batch, T, heads, head_dim]."""
    if q.ndim != 4 or q.shape[2] != self.num_heads:
      raise ValueError(f"q must be [batch, seq, heads={self.num_heads}, head_dim]; got shape {q.shape}")
    return sparse_attention(q, k, v, tau=self.tau[...], theta=self.theta[...], lam=self.lam[...],
                            block_q=self.block_q, block_k=self.block_k, causal=self.causal,
                            backend=self.backend, attention_sink=self.attention_sink, sm_scale=sm_scale,
                            return_stats=return_stats)
