"""The Sparse Feature Attention front door: `sfa_attention` on every SFA backend, with gradients.

SFA keeps each query's `k_q` and each key's `k_k` largest-magnitude features and runs exact softmax
attention over the sparsified logits (`kernels.sfa_reference` defines it, straight-through gradients
included). This module checks the inputs before tracing, picks a backend from `SFA_BACKENDS` (named like
`kernels.block_config.BACKEND_REGISTRY`, but SFA's own choice), and differentiates the kernels with
`jax.custom_vjp`. Two kernel forms, both FlashAttention-style (online softmax over key tiles; the dense
[T, S] scores never exist):

- "dense_tiles": the top-k selection zeroes the dropped features of q and k once (a jnp pass, O(T·d)),
  and each tile's logits are a dense matmul of the zeroed tiles. Attention over zeroed q and k *is*
  block-sparse attention, so this form runs `kernels.block_sparse_triton` with no P·V skip (λ = −∞).
- "codes": queries and keys travel as (index, value) codes and each tile is decoded in registers
  (`kernels.sfa_codes`), reading 2·k numbers per row instead of head_dim.

Both save the per-row log-sum-exp; the backward is the Pallas block-sparse backward
(`kernels.block_sparse_backward`) on the zeroed q and k, whose dq and dk are then masked to the kept
features (the straight-through rule). The "reference" backend is the jnp definition and is differentiated
by `jax.grad` directly. An optional block mask composes SFA with block sparsity: SFA runs inside kept
blocks only, skipped blocks contribute nothing and rows with nothing kept output 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernels.block_index import causal_block_mask, mask_to_kv_indices
from kernels.block_sparse_backward import block_sparse_backward_triton
from kernels.block_sparse_triton import block_sparse_attention_triton
from kernels.sfa_codes import sfa_codes_attention_triton
from kernels.sfa_reference import (check_sfa_inputs, default_scale, sfa_attention_reference, top_k_codes,
                                   top_k_mask)

AUTO = "auto"
DENSE_TILES, CODES = "dense_tiles", "codes"


@dataclasses.dataclass(frozen=True)
class SfaBackend:
  """One way to run `sfa_attention`.

  Attributes:
    name: the `backend=` string.
    form: DENSE_TILES or CODES (a Pallas kernel; module docstring), or None for the jnp reference.
    auto_on: platforms on which `backend="auto"` picks it.
    runs_on: platforms it can run on (None: any); other platforms get a clear error.
    interpret: whether the Pallas kernel runs in interpret mode (CPU).
  """

  name: str
  form: str | None
  auto_on: tuple[str, ...] = ()
  runs_on: tuple[str, ...] | None = None
  interpret: bool = False


# Adding a backend: one line here (a new kernel form also needs a branch in `_forward`).
SFA_BACKENDS: dict[str, SfaBackend] = {
    backend.name: backend for backend in (
        SfaBackend("triton", DENSE_TILES, auto_on=("gpu",), runs_on=("gpu",)),
        SfaBackend("triton_codes", CODES, runs_on=("gpu",)),
        SfaBackend("interpret", DENSE_TILES, interpret=True),
        SfaBackend("interpret_codes", CODES, interpret=True),
        SfaBackend("reference", None, auto_on=("cpu", "tpu")),
    )
}
SFA_BACKEND_NAMES = (AUTO, *SFA_BACKENDS)


def resolve_backend(backend: Any, platform: str) -> SfaBackend:
  """The backend that `backend=` names on `platform` ("auto" picks per platform); ValueError if none."""
  if backend not in SFA_BACKEND_NAMES:
    raise ValueError(f"backend must be one of {SFA_BACKEND_NAMES}; got {backend!r}.")
  if backend == AUTO:
    return next((b for b in SFA_BACKENDS.values() if platform in b.auto_on), SFA_BACKENDS["reference"])
  chosen = SFA_BACKENDS[backend]
  if chosen.runs_on is not None and platform not in chosen.runs_on:
    raise ValueError(f"backend={backend!r} needs a {' or '.join(p.upper() for p in chosen.runs_on)}, but the "
                     f"default platform is {platform!r}; use backend='interpret' (or 'interpret_codes') to "
                     "run the same kernel on CPU, or 'auto'.")
  return chosen


@dataclasses.dataclass(frozen=True)
class _Static:
  """What one compiled SFA kernel call depends on (hashable: the custom_vjp's static argument)."""

  k_q: int
  k_k: int
  causal: bool
  sm_scale: float
  block_q: int
  block_k: int
  backend: SfaBackend


def _forward(q, k, v, q_kept, k_kept, mask, static: _Static, residuals: bool):
  """(out, lse or None) of the static's kernel form; q_kept, k_kept: the top-k masks; mask causal-ANDed."""
  kv_indices, kv_counts = mask_to_kv_indices(mask)
  tiles = dict(causal=static.causal, block_q=static.block_q, block_k=static.block_k,
               sm_scale=static.sm_scale, interpret=static.backend.interpret, return_residuals=residuals)
  if static.backend.form == DENSE_TILES:
    no_skip = jnp.full((q.shape[2],), -jnp.inf, jnp.float32)
    outputs = block_sparse_attention_triton(q * q_kept.astype(q.dtype), k * k_kept.astype(k.dtype), v,
                                            kv_indices, kv_counts, no_skip, **tiles)
    return outputs[0], outputs[2] if residuals else None
  outputs = sfa_codes_attention_triton(top_k_codes(q, static.k_q), top_k_codes(k, static.k_k), v, kv_indices,
                                       kv_counts, **tiles)
  return outputs[0], outputs[1] if residuals else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sfa(q, k, v, mask, static: _Static):
  out, _ = _forward(q, k, v, top_k_mask(q, static.k_q), top_k_mask(k, static.k_k), mask, static,
                    residuals=False)
  return out


def _sfa_fwd(q, k, v, mask, static: _Static):
  q_kept, k_kept = top_k_mask(q, static.k_q), top_k_mask(k, static.k_k)
  out, lse = _forward(q, k, v, q_kept, k_kept, mask, static, residuals=True)
  return out, (q, k, v, q_kept, k_kept, mask, out, lse)


def _sfa_bwd(static: _Static, residuals, d_out):
  q, k, v, q_kept, k_kept, mask, out, lse = residuals
  q_kept, k_kept = q_kept.astype(q.dtype), k_kept.astype(k.dtype)
  # Nothing is P·V-skipped, so every kept block was computed.
  dq, dk, dv = block_sparse_backward_triton(
      q * q_kept, k * k_kept, v, out, lse, d_out, mask, causal=static.causal, block_q=static.block_q,
      block_k=static.block_k, sm_scale=static.sm_scale, interpret=static.backend.interpret)
  # Straight-through: the selection is constant, so only the kept features receive a gradient.
  return dq * q_kept, dk * k_kept, dv, None


_sfa.defvjp(_sfa_fwd, _sfa_bwd)


@functools.partial(jax.jit, static_argnames=("static",))
def _kernel_attention(q, k, v, block_mask, *, static: _Static):
  valid = causal_block_mask(q.shape[1], k.shape[1], causal=static.causal, block_q=static.block_q,
                            block_k=static.block_k)
  mask = jnp.broadcast_to(jnp.asarray(valid), (q.shape[0], q.shape[2], *valid.shape))
  if block_mask is not None:
    mask = mask & block_mask.astype(jnp.bool_)
  return _sfa(q, k, v, mask, static)


def sfa_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, k_q: int, k_k: int, causal: bool = True,
                  sm_scale: float | None = None, backend: str = AUTO, block_q: int = 64, block_k: int = 64,
                  block_mask: jax.Array | None = None) -> jax.Array:
  """Sparse Feature Attention: top-k_q query features against top-k_k key features, exact softmax.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0, one
      floating dtype. Any T and S (the kernels pad).
    k_q, k_k: features kept per query and per key, ints in [1, head_dim] (head_dim: dense attention).
    causal: bottom-right aligned causal masking (u <= t + S - T).
    sm_scale: logit scale, 1/sqrt(head_dim) when None.
    backend: one of `SFA_BACKEND_NAMES`; "auto" is the Triton dense-tile kernel on a GPU and the jnp
      reference elsewhere; "interpret" / "interpret_codes" run the Pallas kernels on CPU.
    block_q, block_k: kernel tiles and block-mask granularity (powers of two >= 16).
    block_mask: None, or bool [batch, heads, ceil(T / block_q), ceil(S / block_k)] (may be traced): SFA
      runs inside kept blocks only; rows with nothing kept output 0.

  Returns:
    [batch, T, heads, head_dim] in q.dtype. Differentiable in q, k and v on every backend, straight-through
    to the kept features (`kernels.sfa_reference`); the kernel backends use the Pallas backward.
  """
  check_sfa_inputs(q, k, v, k_q=k_q, k_k=k_k, causal=causal, sm_scale=sm_scale, block_mask=block_mask,
                   block_q=block_q, block_k=block_k)
  chosen = resolve_backend(backend, jax.default_backend())
  if chosen.form is None:
    return sfa_attention_reference(q, k, v, k_q=k_q, k_k=k_k, causal=causal, sm_scale=sm_scale,
                                   block_mask=block_mask, block_q=block_q, block_k=block_k)
  static = _Static(k_q=int(k_q), k_k=int(k_k), causal=causal, sm_scale=default_scale(q.shape[-1], sm_scale),
                   block_q=int(block_q), block_k=int(block_k), backend=chosen)
  return _kernel_attention(q, k, v, None if block_mask is None else jnp.asarray(block_mask), static=static)
