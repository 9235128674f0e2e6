"""SpargeAttn block-sparse attention for JAX: its parameters, its mask prediction and its public API.

Attention runs in two stages, as in SpargeAttn (thu-ml/SpargeAttn, ICML 2025). Stage 1
(`predict_block_mask`, `kernels.sparge_mask`) pools Q and mean-centred K per block and keeps, for every
q block, the key blocks whose pooled-softmax mass is within τ (top-CDF, at least one), plus every block
of a key or query block whose self-similarity ||mean_t(x_t/||x_t||)||² is not above θ, minus the
causal-invalid ones. Stage 2 (`block_sparse_attention`) visits the kept blocks in ascending order with an
f32 online softmax and skips a block's P·V when Δ = max over rows of (tile row max − running row max) is
below λ; `kernels.sparge_reference` defines it exactly, and the Pallas kernels match it. Element (t, u) is
masked unless t < T, u < S and, when causal, u ≤ t + S − T. τ, θ and λ are per head ([heads] arrays, a
scalar broadcasts) and may be traced, so a tuner reuses one compilation for every value it tries. Concrete
values outside τ ∈ [0, 1], θ real, λ ≤ 0 raise; traced ones cannot be checked before running, so an
invalid head (NaN, or out of range) falls back to exact attention (τ = 1, θ = +inf, λ = -inf) and is
flagged in `SpargeStats.invalid_params`. The
generic machinery (checks, backends, statistics) is `kernels.block_sparse`; this module only adds the
mask predictor, and re-exports `block_sparse_attention`, `BACKENDS` and `SpargeStats` for convenience.

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
  * GQA throughout, without repeating K or V: the predictor pools query head h against kv head
    h // (heads // kv_heads), and every backend reads that kv head (the reference by grouping the query
    heads, Triton and Mosaic through the kv index map, the backward kernels summing over the group);
    SpargeAttn's predictor needs K with Q's head count. θ is compared per query head: SpargeAttn compares
    a GQA group's K-block self-similarity with the kv head's θ, here each query head uses its own θ.
  * No int8/fp8 quantisation of Q, K or V: logits and P·V accumulate in f32 from the input dtype.
  * The attention sink column (key block 0) is off by default, as in SpargeAttn's plug-and-play APIs
    (its tuned path hard-codes it on).
  * Block sizes are any power of two ≥ 16 (default 64 × 64), not tied to a GPU architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from kernels import block_sparse, sparge_mask, sparge_reference
from kernels.block_config import BlockSparseConfig
from kernels.block_sparse import BACKENDS as BACKENDS
from kernels.block_sparse import BlockSparseStats
from kernels.block_sparse import block_sparse_attention as block_sparse_attention

# Bumped whenever the mask-prediction or block-skip semantics change: tuned parameters record it, and a
# run refuses to resume a checkpoint tuned against other semantics.
KERNEL_VERSION = "sparge-1"
SpargeStats = BlockSparseStats  # What a SpargeAttn call reports is what any block-sparse call reports.


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


def check_params(params: Any, heads: int) -> None:
  """Raises a ValueError naming the field unless `params` is a SpargeParams valid for `heads` heads."""
  if not isinstance(params, SpargeParams):
    raise ValueError(f"params must be a SpargeParams; got {type(params).__name__}.")
  block_sparse.check_per_head("params.tau", params.tau, heads, (0.0, 1.0))
  block_sparse.check_per_head("params.theta", params.theta, heads, (-math.inf, math.inf))
  block_sparse.check_per_head("params.lam", params.lam, heads, (-math.inf, 0.0))


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
  config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=causal)
  block_sparse.check_qkv(q, k, None)
  check_params(params, q.shape[2])
  return sparge_mask.predict_block_mask(q, k, params, causal=causal, block_q=config.block_q,
                                        block_k=config.block_k, attention_sink=attention_sink)


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
  config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=causal, backend=backend)
  out, stats = sparge_attend(q, k, v, params, config, attention_sink=attention_sink, sm_scale=sm_scale)
  return (out, stats) if return_stats else out


def sparge_attend(q: jax.Array, k: jax.Array, v: jax.Array, params: SpargeParams, config: BlockSparseConfig,
                  *, attention_sink: bool = False,
                  sm_scale: float | None = None) -> tuple[jax.Array, SpargeStats]:
  """`sparge_attention` with a `BlockSparseConfig`; always returns (out, stats)."""
  block_sparse.check_qkv(q, k, v)
  block_sparse.check_sm_scale(sm_scale)
  check_params(params, q.shape[2])
  mask = sparge_mask.predict_block_mask(q, k, params, causal=config.causal, block_q=config.block_q,
                                        block_k=config.block_k, attention_sink=attention_sink)
  out, stats = block_sparse.run_block_sparse(q, k, v, mask, config, lam=params.lam, sm_scale=sm_scale)
  heads = q.shape[2]
  as_table = lambda value: jnp.broadcast_to(jnp.asarray(value, jnp.float32), (heads,))
  invalid = sparge_mask.invalid_thresholds(as_table(params.tau), as_table(params.theta))
  return out, dataclasses.replace(stats, invalid_params=stats.invalid_params | invalid)


def sparge_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, params: SpargeParams, *,
                               causal: bool = True, block_q: int = 64, block_k: int = 64,
                               attention_sink: bool = False, sm_scale: float | None = None) -> jax.Array:
  """`sparge_attention` in pure jnp (`kernels.sparge_reference`), after the same input checks.

  Returns:
    out [batch, T, heads, head_dim] in q.dtype.
  """
  config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=causal)
  block_sparse.check_qkv(q, k, v)
  block_sparse.check_sm_scale(sm_scale)
  check_params(params, q.shape[2])
  return sparge_reference.sparge_attention_reference(q, k, v, params, causal=causal, block_q=config.block_q,
                                                     block_k=config.block_k, attention_sink=attention_sink,
                                                     sm_scale=block_sparse.default_scale(q, sm_scale))
