"""SpargeAttn as a tunable method: per-head (τ, θ, λ), the predicted block mask and the λ P·V skip.

`SpargeMethod` is what the tuner scores (its latent map is `afbs_jax.attention.latent.LatentMap`);
`SpargeAttention` is the model policy holding `[layers, heads]` tables of τ, θ, λ. The kernels and the
exact semantics are in `kernels.sparge`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from afbs_jax.attention.latent import LatentMap
from afbs_jax.attention.method import MaskMethod, TunedAttention
from kernels.block_config import BlockSparseConfig


@dataclasses.dataclass(frozen=True)
class SpargeMethod(MaskMethod):
  """SpargeAttn with per-head τ (top-CDF), θ (self-similarity), λ (P·V skip).

  Attributes:
    attention_sink: always keep key block 0, as SpargeAttn's tuned path does. LLM heads park most of
      their attention mass on the first tokens; without the sink column the top-CDF selection must spend
      its τ budget re-finding that block in every row, and the reachable sparsity at a 5 % error collapses
      (measured by experiments/latent_frontier.py).
    local_blocks: also keep each query block's `local_blocks` most recent key blocks (the diagonal block
      and those just before it), StreamingLLM's local window as a floor under the predicted mask. Pooled
      block scores blur the local context that perplexity depends on most; with the floor, τ is spent on
      the distant blocks only. 0 (SpargeAttn's behaviour) adds nothing.
  """

  name = "sparge"
  param_names = ("tau", "theta", "lam")
  attention_sink: bool = False
  local_blocks: int = 0

  def __post_init__(self):
    if isinstance(self.local_blocks, bool) or not isinstance(self.local_blocks, (int, np.integer)) \
        or self.local_blocks < 0:
      raise ValueError(f"local_blocks must be an integer >= 0 (key blocks per row); got {self.local_blocks!r}")
    object.__setattr__(self, "local_blocks", int(self.local_blocks))

  def default_latent(self) -> LatentMap:
    return LatentMap()

  def block_mask(self, q, k, params, blocks):
    from kernels import block_index, sparge  # pylint: disable=g-import-not-at-top
    mask = sparge.predict_block_mask(q, k, self.kernel_params(params), causal=blocks.causal,
                                     block_q=blocks.block_q, block_k=blocks.block_k,
                                     attention_sink=self.attention_sink)
    if self.local_blocks:
      mask |= block_index.local_block_mask(q.shape[1], k.shape[1], block_q=blocks.block_q,
                                           block_k=blocks.block_k, window=self.local_blocks)
    return mask

  def skip_threshold(self, params):
    return params["lam"]

  @staticmethod
  def kernel_params(params: Mapping[str, Any]):
    """{"tau", "theta", "lam"} → `kernels.sparge.SpargeParams`."""
    from kernels import sparge  # pylint: disable=g-import-not-at-top
    return sparge.SpargeParams(tau=params["tau"], theta=params["theta"], lam=params["lam"])

  def policy(self, tables: Mapping[str, Any], blocks: BlockSparseConfig) -> SpargeAttention:
    return SpargeAttention(tables["tau"], tables["theta"], tables["lam"], block_q=blocks.block_q,
                           block_k=blocks.block_k, backend=blocks.backend, attention_sink=self.attention_sink,
                           local_blocks=self.local_blocks)


@jax.tree_util.register_pytree_node_class
class SpargeAttention(TunedAttention):
  """SpargeAttn block-sparse attention with per-layer, per-head thresholds.

  Attributes:
    tau: f32 [layers, heads], cumulative-mass threshold of the pooled-score softmax (1 keeps every block).
    theta: f32 [layers, heads], self-similarity threshold (>= 1 marks every block non-similar, i.e. dense).
    lam: f32 [layers, heads], P·V skip threshold (natural-log units, <= 0; -inf never skips).
    block_q, block_k: static block sizes of the mask and kernel.
    backend: static kernel backend name ("auto" picks per platform).
    attention_sink: static; always keep key block 0 (SpargeAttn's tuned path does).
    local_blocks: static; always keep each query block's most recent key blocks (`SpargeMethod`).
  """

  def __init__(self, tau: Any, theta: Any, lam: Any, *, block_q: int, block_k: int, backend: str = "auto",
               attention_sink: bool = False, local_blocks: int = 0):
    super().__init__(SpargeMethod(attention_sink=bool(attention_sink), local_blocks=local_blocks),
                     {"tau": tau, "theta": theta, "lam": lam},
                     BlockSparseConfig(block_q=block_q, block_k=block_k, causal=True, backend=backend))

  @classmethod
  def constant(cls, num_layers: int, num_heads: int, *, tau: float, theta: float, lam: float = -np.inf,
               **static) -> SpargeAttention:
    """The same (tau, theta, lam) for every layer and head; `static` as in the constructor."""
    return cls(*(np.full((num_layers, num_heads), value, np.float32) for value in (tau, theta, lam)), **static)

  tau = property(lambda self: self.tables["tau"])
  theta = property(lambda self: self.tables["theta"])
  lam = property(lambda self: self.tables["lam"])
  block_q = property(lambda self: self.blocks.block_q)
  block_k = property(lambda self: self.blocks.block_k)
  backend = property(lambda self: self.blocks.backend)
  attention_sink = property(lambda self: self.method.attention_sink)
  local_blocks = property(lambda self: self.method.local_blocks)
