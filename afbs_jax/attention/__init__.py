"""Attention methods and the policies that put them in a model.

The policy seam (`policy.py`): every model layer calls `policy(q, k, v, *, layer, q_positions=None)`.
Policies: `DenseAttention` (function form `dense_attention`); `TunedAttention` (any `AttentionMethod`
with [layers, heads] tables) and its SpargeAttn form `SpargeAttention`; `BlockMaskAttention` (a mask function). Methods: `AttentionMethod`,
`MaskMethod` (block-mask methods on the shared kernel), `SpargeMethod`; the registry `get_method`,
`register_method`, `METHODS`. Latent maps: `LatentMap` (SpargeAttn), `LinearLatent` (any method). The
reference every method is scored against: `dense_reference`, `relative_l1_per_head`. Decode steps
against a KV cache (`decode.py`): `DecodeSparseAttention`, a block-sparse decode policy, and
`DecodeMethod`, its per-head τ as a tunable method (registry name "decode").
"""

from afbs_jax.attention.block_mask import BlockMaskAttention as BlockMaskAttention
from afbs_jax.attention.decode import DecodeMethod as DecodeMethod
from afbs_jax.attention.decode import DecodeSparseAttention as DecodeSparseAttention
from afbs_jax.attention.dense import DenseAttention as DenseAttention
from afbs_jax.attention.dense import dense_attention as dense_attention
from afbs_jax.attention.latent import LatentMap as LatentMap
from afbs_jax.attention.latent import LinearLatent as LinearLatent
from afbs_jax.attention.method import AttentionMethod as AttentionMethod
from afbs_jax.attention.method import MaskMethod as MaskMethod
from afbs_jax.attention.method import TunedAttention as TunedAttention
from afbs_jax.attention.policy import Policy as Policy
from afbs_jax.attention.policy import check_qkv as check_qkv
from afbs_jax.attention.reference import dense_reference as dense_reference
from afbs_jax.attention.reference import relative_l1_per_head as relative_l1_per_head
from afbs_jax.attention.registry import METHODS as METHODS
from afbs_jax.attention.registry import get_method as get_method
from afbs_jax.attention.registry import register_method as register_method
from afbs_jax.attention.sparge import SpargeAttention as SpargeAttention
from afbs_jax.attention.sparge import SpargeMethod as SpargeMethod
