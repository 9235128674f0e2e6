"""SpargeAttn end to end in pure jnp: the predicted block mask, then the block-sparse reference with λ.

`kernels.block_sparse_reference` defines block-sparse attention itself; this module composes it with
SpargeAttn's mask predictor. `kernels.sparge` documents the semantics and the differences from SpargeAttn.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from kernels import sparge_mask
from kernels.block_sparse_reference import block_sparse_attention_reference as block_sparse_attention_reference


def sparge_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, params: Any, *, causal: bool = True,
                               block_q: int = 64, block_k: int = 64, attention_sink: bool = False,
                               sm_scale: float | None = None) -> jax.Array:
  """SpargeAttn end to end in jnp: the predicted block mask, then the reference attention with λ.

  Inputs are not validated here; `kernels.sparge.sparge_attention_reference` is the checked public entry.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim].
    params: `SpargeParams` (τ, θ, λ, each a scalar or [heads]).
    causal, block_q, block_k, attention_sink: as in `kernels.sparge_mask.predict_block_mask`.
    sm_scale: logit scale, 1/sqrt(head_dim) when None.

  Returns:
    out: [batch, T, heads, head_dim] in q.dtype.
  """
  mask = sparge_mask.predict_block_mask(q, k, params, causal=causal, block_q=block_q, block_k=block_k,
                                        attention_sink=attention_sink)
  sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
  lam = jnp.broadcast_to(jnp.asarray(params.lam, jnp.float32), (q.shape[2],))
  out, _ = block_sparse_attention_reference(q, k, v, mask, lam, causal=causal, block_q=block_q,
                                            block_k=block_k, sm_scale=sm_scale)
  return out
