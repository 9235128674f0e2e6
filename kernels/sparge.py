"""SpargeAttn block-sparse attention for JAX: the public API, input checks, backend choice and statistics.

Attention runs in two stages, as in SpargeAttn (thu-ml/SpargeAttn, ICML 2025). Stage 1
(`predict_block_mask`, `kernels.sparge_mask`) pools Q and mean-centred K per block and keeps, for every
q block, the key blocks whose pooled-softmax mass is within τ (top-CDF, at least one), plus every block
of a key or query block whose self-similarity ||mean_t(x_t/||x_t||)||² is not above θ, minus the
causal-invalid ones. Stage 2 (`block_sparse_attention`) visits the kept blocks in ascending order with an
f32 online softmax and skips a block's P·V when Δ = max over rows of (tile row max − running row max) is
below λ; `kernels.sparge_reference` defines it exactly, and the Pallas kernels match it. Element (t, u) is
masked unless t < T, u < S and, when causal, u ≤ t + S − T. τ, θ and λ are per head ([heads] arrays, a
scalar broadcasts) and may be traced, so a tuner reuses one compilation for every value it tries.

Deliberate differences from SpargeAttn's source (`spas_sage_attn/utils.py`, `core.py`, `csrc/qattn`):
  * The pooled softmax and its CDF run in f32; SpargeAttn keeps the input dtype (bf16 resolves the CDF to
    about 0.004). τ ≥ 1 keeps every allowed block outright, so rounding can never drop one.
  * Blocks tied with the n-th largest pooled probability are all kept (order-free); SpargeAttn keeps
    exactly n by sort position.
  * Pooling and self-similarity use only the valid tokens of a partial last block; SpargeAttn's zero
    padding gives NaN there, which marks the block non-similar. K is centred with the mean over valid
    tokens only.
  * Causal masking is token-level and bottom-right aligned (T ≠ S aligns the last query with the last
    key), in the mask predictor and in attention; SpargeAttn's block mask is top-left aligned and its
    SageAttention2 wrappers apply no token-level causal mask at all.
  * λ is in natural-log units of the scaled logits and signed: skip iff Δ < λ ≤ 0, so SpargeAttn's
    `pvthreshd` p maps to λ = −p·ln 2, and λ = −∞ (or `lam=None`) never skips. Positive λ is rejected.
  * Any kept block may be skipped except a row's first computed one; SpargeAttn never skips the last
    kept block (the last two on sm80/89). Rows past T and rows with no unmasked logit in the tile take
    no part in Δ, and a tile with none contributes nothing and is not counted.
  * GQA is supported in the predictor (query head h pools against kv head h // (heads // kv_heads));
    SpargeAttn's predictor needs K with Q's head count.
  * No int8/fp8 quantisation of Q, K or V: logits and P·V accumulate in f32 from the input dtype.
  * The attention sink column (key block 0) is off by default, as in SpargeAttn's plug-and-play APIs
    (its tuned path hard-codes it on).
  * Block sizes are any power of two ≥ 16 (default 64 × 64), not tied to a GPU architecture.
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

from kernels import sparge_mask, sparge_reference
from kernels.block_index import mask_to_kv_indices

BACKENDS = ("auto", "triton", "mosaic", "interpret", "reference")
# Bumped whenever the mask-prediction or block-skip semantics change: tuned parameters record it, and a
# run refuses to resume a checkpoint tuned against other semantics.
KERNEL_VERSION = "sparge-1"
_MIN_BLOCK = 16


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tau", "theta", "lam"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SpargeParams:
  """Per-head SpargeAttn thresholds; each a float scalar (broadcast to every head) or an f32 [heads] array.

  Attributes:
    tau: top-CDF mass in [0, 1]; lower keeps fewer blocks.
    theta: self-similarity threshold; lower trusts more pooled blocks (sparser), θ < 0 trusts all,
      θ >= 1 none (dense).
    lam: P·V skip threshold, natural-log units, <= 0; closer to 0 skips more, −inf never skips.
  """
  tau: Any
  theta: Any
  lam: Any = -math.inf


@functools.partial(jax.tree_util.register_dataclass, data_fields=["density", "pv_skipped"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SpargeStats:
  """Sparsity actually achieved by one attention call.

  Attributes:
    density: f32 [batch, heads], kept blocks / causal-valid blocks (a block is causal-valid when any of
      its elements is unmasked).
    pv_skipped: f32 [batch, heads], P·V-skipped blocks / kept blocks (0 where nothing is kept).
  """
  density: jax.Array
  pv_skipped: jax.Array


# ----------------------------------------------------------------------------------------------------
# Validation: every check runs on shapes and dtypes before tracing; value checks only on concrete params.


def _concrete(value: Any) -> np.ndarray | None:
  """The value as a numpy array, or None when it is traced (value checks are then skipped)."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_arrays(q: Any, k: Any, v: Any | None) -> None:
  named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
  for name, x in named.items():
    if not hasattr(x, "shape") or len(x.shape) != 4:
      raise ValueError(f"{name} must be a 4-d array [batch, seq, heads, head_dim]; got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype; got {x.dtype}.")
    if min(x.shape) < 1:
      raise ValueError(f"{name} must have no empty axis; got shape {tuple(x.shape)}.")
  batch, _, heads, head_dim = q.shape
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(f"k must be [batch={batch}, S, kv_heads, head_dim={head_dim}] to match q "
                     f"{tuple(q.shape)}; got {tuple(k.shape)}.")
  if v is not None and tuple(v.shape) != tuple(k.shape):
    raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}.")
  if heads % k.shape[2]:
    raise ValueError(f"q heads ({heads}) must be a multiple of k kv_heads ({k.shape[2]}).")


def _check_blocks(block_q: Any, block_k: Any) -> None:
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if (not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < _MIN_BLOCK
        or block & (block - 1)):
      raise ValueError(f"{name} must be a power of two >= {_MIN_BLOCK}; got {block!r}.")


def _check_backend(backend: Any) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")


def _check_sm_scale(sm_scale: Any) -> None:
  if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)
                                   and sm_scale > 0):
    raise ValueError(f"sm_scale must be None or a positive finite float; got {sm_scale!r}.")


def _check_per_head(name: str, value: Any, heads: int, allowed: tuple[float, float]) -> None:
  """A scalar or [heads] array of reals, within `allowed` (inclusive) when concrete."""
  shape = tuple(getattr(value, "shape", np.shape(value)))
  if shape not in ((), (heads,)):
    raise ValueError(f"{name} must be a scalar or have shape ({heads},) (one per query head); got shape "
                     f"{shape}.")
  dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"{name} must be real-valued; got dtype {dtype}.")
  concrete = _concrete(value)
  if concrete is None:
    return
  if np.isnan(concrete).any():
    raise ValueError(f"{name} must not contain NaN; got {concrete}.")
  low, high = allowed
  if np.any(concrete < low) or np.any(concrete > high):
    raise ValueError(f"{name} must lie in [{low}, {high}]; got {concrete}.")


def _check_params(params: Any, heads: int) -> None:
  if not isinstance(params, SpargeParams):
    raise ValueError(f"params must be a SpargeParams; got {type(params).__name__}.")
  _check_per_head("params.tau", params.tau, heads, (0.0, 1.0))
  _check_per_head("params.theta", params.theta, heads, (-math.inf, math.inf))
  _check_per_head("params.lam", params.lam, heads, (-math.inf, 0.0))


def _check_mask(mask: Any, expected_shape: tuple[int, ...]) -> None:
  shape = tuple(getattr(mask, "shape", ()))
  if shape != expected_shape:
    raise ValueError(f"mask must have shape {expected_shape} [batch, heads, n_q_blocks, n_k_blocks]; got "
                     f"{shape}.")
  if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
    raise ValueError(f"mask must be bool (or integer 0/1); got dtype {mask.dtype}.")


def _mask_shape(q: Any, k: Any, block_q: int, block_k: int) -> tuple[int, int, int, int]:
  return (q.shape[0], q.shape[2], math.ceil(q.shape[1] / block_q), math.ceil(k.shape[1] / block_k))


# ----------------------------------------------------------------------------------------------------
# Backends.


def _load_kernel(module_name: str, function_name: str) -> Callable[..., Any]:
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name != module_name:
      raise
    raise NotImplementedError(f"{module_name} is not available, so this backend cannot run; use "
                              "backend='reference'.") from error
  return getattr(module, function_name)


def _resolve_backend(backend: str) -> tuple[str, bool]:
  """Maps a backend name to (kernel family, interpret flag) for the current default platform."""
  platform = jax.default_backend()
  if backend == "auto":
    backend = {"gpu": "triton", "tpu": "mosaic"}.get(platform, "reference")
  if backend == "triton" and platform != "gpu":
    raise ValueError(f"backend='triton' needs a GPU, but the default platform is {platform!r}; use "
                     "backend='interpret' to run the same kernel on CPU.")
  if backend == "interpret":
    return "triton", True
  return backend, backend == "mosaic" and platform != "tpu"


def _run_backend(backend: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, lam: jax.Array, *,
                 causal: bool, block_q: int, block_k: int, sm_scale: float) -> tuple[jax.Array, jax.Array]:
  """Runs one backend on a mask already ANDed with causal validity -> (out, pv_skipped [b, h, n_q])."""
  family, interpret = _resolve_backend(backend)
  if family == "reference":
    return sparge_reference.block_sparse_attention_reference(
        q, k, v, mask, lam, causal=causal, block_q=block_q, block_k=block_k, sm_scale=sm_scale)
  kernel = (_load_kernel("kernels.block_sparse_triton", "block_sparse_attention_triton") if family == "triton"
            else _load_kernel("kernels.block_sparse_mosaic", "block_sparse_attention_mosaic"))
  kv_indices, kv_counts = mask_to_kv_indices(mask)
  return kernel(q, k, v, kv_indices, kv_counts, lam, causal=causal, block_q=block_q, block_k=block_k,
                sm_scale=sm_scale, interpret=interpret)


def _stats(mask: jax.Array, pv_skipped: jax.Array, causal_valid: np.ndarray) -> SpargeStats:
  kept = mask.sum(axis=(2, 3), dtype=jnp.float32)
  density = kept / max(int(causal_valid.sum()), 1)
  skipped = pv_skipped.sum(axis=2, dtype=jnp.float32)
  return SpargeStats(density=density, pv_skipped=jnp.where(kept > 0, skipped / jnp.maximum(kept, 1.0), 0.0))


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "sm_scale", "backend"))
def _attend(q, k, v, mask, lam, *, causal, block_q, block_k, sm_scale, backend):
  """Block-sparse attention on a user mask -> (out, SpargeStats)."""
  causal_valid = sparge_mask.causal_block_mask(q.shape[1], k.shape[1], causal=causal, block_q=block_q,
                                               block_k=block_k)
  mask = mask.astype(jnp.bool_) & causal_valid
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (q.shape[2],))
  out, pv_skipped = _run_backend(backend, q, k, v, mask, lam, causal=causal, block_q=block_q,
                                 block_k=block_k, sm_scale=sm_scale)
  return out, _stats(mask, pv_skipped, causal_valid)


def _default_scale(q: Any, sm_scale: float | None) -> float:
  return 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)


# ----------------------------------------------------------------------------------------------------
# Public API.


def predict_block_mask(q: jax.Array, k: jax.Array, params: SpargeParams, *, causal: bool = True,
                       block_q: int = 64, block_k: int = 64, attention_sink: bool = False) -> jax.Array:
  """SpargeAttn's stage-1 block mask (see `kernels.sparge_mask.predict_block_mask`).

  Args:
    q: [batch, T, heads, head_dim]; k: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    params: SpargeParams; τ and θ are used (λ only matters in attention).
    causal, block_q, block_k, attention_sink: see the module docstring.

  Returns:
    bool [batch, heads, ceil(T / block_q), ceil(S / block_k)], already ANDed with causal validity.
  """
  _check_arrays(q, k, None)
  _check_blocks(block_q, block_k)
  _check_params(params, q.shape[2])
  return sparge_mask.predict_block_mask(q, k, params, causal=causal, block_q=block_q, block_k=block_k,
                                        attention_sink=attention_sink)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                           lam: jax.Array | float | None = None, causal: bool = True, block_q: int = 64,
                           block_k: int = 64, backend: str = "auto", sm_scale: float | None = None,
                           return_stats: bool = False) -> jax.Array | tuple[jax.Array, SpargeStats]:
  """Attention over the kept blocks of any block mask (baselines reuse the SpargeAttn kernels).

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    mask: bool [batch, heads, ceil(T / block_q), ceil(S / block_k)]; ANDed with causal validity here.
    lam: None (no skip), a scalar or [heads]; natural-log units, <= 0.
    causal: bottom-right aligned token-level causal masking.
    block_q, block_k: powers of two >= 16.
    backend: "auto" | "triton" | "mosaic" | "interpret" | "reference".
    sm_scale: logit scale, 1/sqrt(head_dim) when None.
    return_stats: also return SpargeStats.

  Returns:
    out [batch, T, heads, head_dim] in q.dtype (rows with nothing kept are 0), and SpargeStats if asked.
  """
  _check_arrays(q, k, v)
  _check_blocks(block_q, block_k)
  _check_backend(backend)
  _check_sm_scale(sm_scale)
  _check_mask(mask, _mask_shape(q, k, block_q, block_k))
  lam = -math.inf if lam is None else lam
  _check_per_head("lam", lam, q.shape[2], (-math.inf, 0.0))
  out, stats = _attend(q, k, v, jnp.asarray(mask), lam, causal=causal, block_q=block_q, block_k=block_k,
                       sm_scale=_default_scale(q, sm_scale), backend=backend)
  return (out, stats) if return_stats else out


def sparge_attention(q: jax.Array, k: jax.Array, v: jax.Array, params: SpargeParams, *, causal: bool = True,
                     block_q: int = 64, block_k: int = 64, backend: str = "auto",
                     attention_sink: bool = False, sm_scale: float | None = None,
                     return_stats: bool = False) -> jax.Array | tuple[jax.Array, SpargeStats]:
  """SpargeAttn attention: predict the block mask from τ, θ, then attend with the λ P·V skip.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0.
    params: SpargeParams with per-head (or scalar) τ, θ, λ; may be traced (no recompilation).
    causal, block_q, block_k, backend, sm_scale, return_stats: as in `block_sparse_attention`.
    attention_sink: always keep key block 0 (SpargeAttn's tuned path turns this on).

  Returns:
    out [batch, T, heads, head_dim] in q.dtype, and SpargeStats if `return_stats`.
  """
  _check_arrays(q, k, v)
  _check_blocks(block_q, block_k)
  _check_backend(backend)
  _check_sm_scale(sm_scale)
  _check_params(params, q.shape[2])
  mask = sparge_mask.predict_block_mask(q, k, params, causal=causal, block_q=block_q, block_k=block_k,
                                        attention_sink=attention_sink)
  out, stats = _attend(q, k, v, mask, params.lam, causal=causal, block_q=block_q, block_k=block_k,
                       sm_scale=_default_scale(q, sm_scale), backend=backend)
  return (out, stats) if return_stats else out


def sparge_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, params: SpargeParams, *,
                               causal: bool = True, block_q: int = 64, block_k: int = 64,
                               attention_sink: bool = False, sm_scale: float | None = None) -> jax.Array:
  """`sparge_attention` in pure jnp (`kernels.sparge_reference`), after the same input checks.

  Returns:
    out [batch, T, heads, head_dim] in q.dtype.
  """
  _check_arrays(q, k, v)
  _check_blocks(block_q, block_k)
  _check_sm_scale(sm_scale)
  _check_params(params, q.shape[2])
  return sparge_reference.sparge_attention_reference(q, k, v, params, causal=causal, block_q=block_q,
                                                     block_k=block_k, attention_sink=attention_sink,
                                                     sm_scale=_default_scale(q, sm_scale))
