"""The block-sparse front door: attention over the kept blocks of any block mask, on any backend.

Every mask-driven method (SpargeAttn, a local window, a top-k oracle, ...) ends here: it computes a bool
block mask `[batch, heads, n_q_blocks, n_k_blocks]` and calls `block_sparse_attention` (keyword form) or
`run_block_sparse` (with a `BlockSparseConfig`). This module checks the inputs before tracing, ANDs the
mask with causal validity, compacts it into per-row kept-block lists (`kernels.block_index`), dispatches to
the backend named in `kernels.block_config.BACKEND_REGISTRY`, and turns what the kernel reports into
`BlockSparseStats`. Backends visit the kept blocks of each row in ascending order with an f32 online
softmax and skip a block's P·V when Δ = max over rows of (tile row max − running row max) is below λ
(`kernels.block_sparse_reference` defines it exactly, non-finite inputs included). λ is per head
([heads], a scalar broadcasts) and may be traced, so one compilation serves every value a tuner tries.
Attention is differentiable in q, k and v on every backend (`jax.custom_vjp`): the mask and the P·V-skip
decisions are constants, and the gradient is the VJP of the jnp reference, computed by the backend's
backward kernel where it has one (Triton, and interpret on CPU: `kernels.block_sparse_backward`) and as
that VJP itself otherwise (reference, Mosaic). Nothing here knows about SpargeAttn.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_config import BlockSparseConfig, backend_names
from kernels.block_index import causal_block_mask, mask_to_kv_indices
from kernels.block_sparse_reference import block_sparse_attention_reference


@functools.partial(jax.tree_util.register_dataclass, data_fields=["density", "pv_skipped", "invalid_params"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BlockSparseStats:
  """Sparsity actually achieved by one attention call.

  Attributes:
    density: f32 [batch, heads], kept blocks / causal-valid blocks (a block is causal-valid when any of
      its elements is unmasked).
    pv_skipped: f32 [batch, heads], P·V-skipped blocks / kept blocks (0 where nothing is kept).
    invalid_params: bool [heads], heads whose traced thresholds were out of range or NaN (concrete ones
      raise before tracing). Such a threshold is replaced by its dense-equivalent value (λ = -inf: no P·V
      skip; for SpargeAttn τ = 1 and θ = +inf: every block kept), so the head computes exact attention.
  """
  density: jax.Array
  pv_skipped: jax.Array
  invalid_params: jax.Array


# ----------------------------------------------------------------------------------------------------
# Checks shared by every block-sparse method: shapes and dtypes before tracing, values only when concrete.


def concrete(value: Any) -> np.ndarray | None:
  """The value as a numpy array, or None when it is traced (value checks are then skipped)."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_qkv(q: Any, k: Any, v: Any | None) -> None:
  """q: [batch, T, heads, head_dim]; k (and v): [batch, S, kv_heads, head_dim], heads % kv_heads == 0.

  All of them floating and of one dtype (a mix raises; nothing is promoted).
  """
  named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
  for name, x in named.items():
    if not hasattr(x, "shape") or len(x.shape) != 4:
      raise ValueError(f"{name} must be a 4-d array [batch, seq, heads, head_dim]; got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype; got {x.dtype}.")
    if min(x.shape) < 1:
      raise ValueError(f"{name} must have no empty axis; got shape {tuple(x.shape)}.")
  if len({jnp.dtype(x.dtype) for x in named.values()}) > 1:
    # No silent promotion: the kernels feed the input dtype to the matmuls, so a mix is a caller's bug.
    given = ", ".join(f"{name} {jnp.dtype(x.dtype).name}" for name, x in named.items())
    raise ValueError(f"{', '.join(named)} must share one floating dtype (float32, bfloat16 or float16, "
                     f"say); got {given}. Cast them to one dtype first.")
  batch, _, heads, head_dim = q.shape
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k must be [batch={batch}, S, kv_heads, head_dim={head_dim}] to match q "
                     f"{tuple(q.shape)}; got {tuple(k.shape)}.")
  if v is not None and tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}.")
  if heads % k.shape[2]:
    raise ValueError(f"q heads ({heads}) must be a multiple of k kv_heads ({k.shape[2]}).")


def check_sm_scale(sm_scale: Any) -> None:
  if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)
                                   and sm_scale > 0):
    raise ValueError(f"sm_scale must be None or a positive finite float; got {sm_scale!r}.")


def check_per_head(name: str, value: Any, heads: int, allowed: tuple[float, float]) -> None:
  """A scalar or [heads] array of reals, within `allowed` (inclusive) when concrete."""
  shape = tuple(getattr(value, "shape", np.shape(value)))
  if shape not in ((), (heads,)):
    raise ValueError(f"{name} must be a scalar or have shape ({heads},) (one per query head); got shape "
                     f"{shape}.")
  dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"{name} must be real-valued; got dtype {dtype}.")
  values = concrete(value)
  if values is None:
    return
  if np.isnan(values).any():
    raise ValueError(f"{name} must not contain NaN; got {values}.")
  low, high = allowed
  if np.any(values < low) or np.any(values > high):
    raise ValueError(f"{name} must lie in [{low}, {high}]; got {values}.")


def mask_shape(q: Any, k: Any, config: BlockSparseConfig) -> tuple[int, int, int, int]:
  """[batch, heads, n_q_blocks, n_k_blocks] of the block mask for q, k under `config`."""
  return (q.shape[0], q.shape[2], *config.num_blocks(q.shape[1], k.shape[1]))


def check_mask(mask: Any, expected_shape: tuple[int, ...]) -> None:
  shape = tuple(getattr(mask, "shape", ()))
  if shape != expected_shape:
    raise ValueError(f"mask must have shape {expected_shape} [batch, heads, n_q_blocks, n_k_blocks]; got "
                     f"{shape}.")
  if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
    raise ValueError(f"mask must be bool (or integer 0/1); got dtype {mask.dtype}.")


def default_scale(q: Any, sm_scale: float | None) -> float:
  return 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)


# ----------------------------------------------------------------------------------------------------
# Dispatch.


def _load_kernel(spec: str) -> Callable[..., Any]:
  module_name, function_name = spec.split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name != module_name:
      raise
    raise NotImplementedError(f"{module_name} is not available, so this backend cannot run; use "
                              "backend='reference'.") from error
  return getattr(module, function_name)


def _run_backend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, lam: jax.Array,
                 config: BlockSparseConfig, sm_scale: float) -> tuple[jax.Array, jax.Array]:
  """Runs the configured backend on a mask already ANDed with causal validity -> (out, pv_skipped)."""
  platform = jax.default_backend()
  config, backend = config.for_platform(platform, head_dim=q.shape[-1], dtype=q.dtype)
  if backend.kernel is None:
    return block_sparse_attention_reference(
        q, k, v, mask, lam, causal=config.causal, block_q=config.block_q, block_k=config.block_k,
        sm_scale=sm_scale)
  kernel = _load_kernel(backend.kernel)
  kv_indices, kv_counts = mask_to_kv_indices(mask)
  return kernel(q, k, v, kv_indices, kv_counts, lam, causal=config.causal, block_q=config.block_q,
                block_k=config.block_k, sm_scale=sm_scale, interpret=backend.interprets_on(platform))


def _stats(mask: jax.Array, pv_skipped: jax.Array, causal_valid: np.ndarray,
           invalid_params: jax.Array) -> BlockSparseStats:
  kept = mask.sum(axis=(2, 3), dtype=jnp.float32)
  density = kept / max(int(causal_valid.sum()), 1)
  skipped = pv_skipped.sum(axis=2, dtype=jnp.float32)
  return BlockSparseStats(density=density,
                          pv_skipped=jnp.where(kept > 0, skipped / jnp.maximum(kept, 1.0), 0.0),
                          invalid_params=invalid_params)


# ----------------------------------------------------------------------------------------------------
# Differentiation. The mask and the skip decisions are constants; λ and the mask get no cotangent.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, mask, lam, config: BlockSparseConfig, sm_scale: float):
  """(out, pv_skipped) of the configured backend, differentiable in q, k, v; mask already causal-ANDed."""
  return _run_backend(q, k, v, mask, lam, config, sm_scale)


def _attention_fwd(q, k, v, mask, lam, config: BlockSparseConfig, sm_scale: float):
  platform = jax.default_backend()
  resolved, backend = config.for_platform(platform, head_dim=q.shape[-1], dtype=q.dtype)
  if backend.backward is None:
    return _run_backend(q, k, v, mask, lam, config, sm_scale), (q, k, v, mask, lam, None, None)
  kv_indices, kv_counts = mask_to_kv_indices(mask)
  out, pv_skipped, lse, tile_skipped = _load_kernel(backend.kernel)(
      q, k, v, kv_indices, kv_counts, lam, causal=resolved.causal, block_q=resolved.block_q,
      block_k=resolved.block_k, sm_scale=sm_scale, interpret=backend.interprets_on(platform),
      return_residuals=True)
  computed = mask & (tile_skipped == 0)
  return (out, pv_skipped), (q, k, v, computed, lam, out, lse)


def _attention_bwd(config: BlockSparseConfig, sm_scale: float, residuals, cotangents):
  d_out, _ = cotangents
  q, k, v, mask, lam, out, lse = residuals
  platform = jax.default_backend()
  resolved, backend = config.for_platform(platform, head_dim=q.shape[-1], dtype=q.dtype)
  statics = dict(causal=resolved.causal, block_q=resolved.block_q, block_k=resolved.block_k,
                 sm_scale=sm_scale)
  if backend.backward is None:
    # No backward kernel (the reference, Mosaic): the VJP of the jnp reference, recomputing its forward.
    def reference(q, k, v):
      return block_sparse_attention_reference(q, k, v, mask, lam, **statics)[0]
    dq, dk, dv = jax.vjp(reference, q, k, v)[1](d_out)
  else:
    dq, dk, dv = _load_kernel(backend.backward)(q, k, v, out, lse, d_out, mask,
                                                interpret=backend.interprets_on(platform), **statics)
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("config", "sm_scale"))
def _attend(q, k, v, mask, lam, *, config: BlockSparseConfig, sm_scale: float):
  causal_valid = causal_block_mask(q.shape[1], k.shape[1], causal=config.causal, block_q=config.block_q,
                                   block_k=config.block_k)
  mask = mask.astype(jnp.bool_) & causal_valid
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (q.shape[2],))
  # A traced λ escapes check_per_head: NaN or > 0 (which would skip nearly every P·V) becomes -inf.
  invalid = jnp.isnan(lam) | (lam > 0)
  lam = jnp.where(invalid, -jnp.inf, lam)
  out, pv_skipped = _attention(q, k, v, mask, lam, config, sm_scale)
  return out, _stats(mask, pv_skipped, causal_valid, invalid)


# ----------------------------------------------------------------------------------------------------
# Public API.


def run_block_sparse(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, config: BlockSparseConfig, *,
                     lam: jax.Array | float | None = None,
                     sm_scale: float | None = None) -> tuple[jax.Array, BlockSparseStats]:
  """Attention over the kept blocks of `mask` under `config`; what every block-sparse method calls.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    mask: bool [batch, heads, n_q_blocks, n_k_blocks]; ANDed with causal validity here; may be traced.
    config: block sizes, causality and backend.
    lam: None (no P·V skip), a scalar or [heads]; natural-log units, <= 0; may be traced.
    sm_scale: logit scale, 1/sqrt(head_dim) when None.

  Returns:
    out [batch, T, heads, head_dim] in q.dtype (rows with nothing kept are 0), and BlockSparseStats.
    Differentiable in q, k, v on every backend (mask and skip decisions constant; λ gets no gradient);
    NaN/inf inputs propagate as in dense attention (`kernels.block_sparse_reference` says exactly how).
  """
  if not isinstance(config, BlockSparseConfig):
    raise ValueError(f"config must be a BlockSparseConfig; got {type(config).__name__}.")
  check_qkv(q, k, v)
  check_sm_scale(sm_scale)
  check_mask(mask, mask_shape(q, k, config))
  lam = -math.inf if lam is None else lam
  check_per_head("lam", lam, q.shape[2], (-math.inf, 0.0))
  return _attend(q, k, v, jnp.asarray(mask), lam, config=config, sm_scale=default_scale(q, sm_scale))


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                           lam: jax.Array | float | None = None, causal: bool = True, block_q: int = 64,
                           block_k: int = 64, backend: str = "auto", sm_scale: float | None = None,
                           return_stats: bool = False) -> jax.Array | tuple[jax.Array, BlockSparseStats]:
  """`run_block_sparse` with the configuration spelled out as keywords.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    mask: bool [batch, heads, ceil(T / block_q), ceil(S / block_k)]; ANDed with causal validity here.
    lam: None (no skip), a scalar or [heads]; natural-log units, <= 0.
    causal: bottom-right aligned token-level causal masking.
    block_q, block_k: powers of two >= 16.
    backend: one of `BACKENDS` ("auto" picks per platform).
    sm_scale: logit scale, 1/sqrt(head_dim) when None.
    return_stats: also return BlockSparseStats.

  Returns:
    out [batch, T, heads, head_dim] in q.dtype (rows with nothing kept are 0), and stats if asked;
    differentiable in q, k, v as `run_block_sparse` is.
  """
  config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=causal, backend=backend)
  out, stats = run_block_sparse(q, k, v, mask, config, lam=lam, sm_scale=sm_scale)
  return (out, stats) if return_stats else out


BACKENDS = backend_names()
