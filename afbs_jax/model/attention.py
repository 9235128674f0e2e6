"""The model's attention seam; the policies themselves live in `afbs_jax.attention`.

Re-exported here so that model code and existing imports (`afbs_jax.model.attention.SpargeAttention`)
keep working.
"""

from afbs_jax.attention.block_mask import BlockMaskAttention as BlockMaskAttention
from afbs_jax.attention.block_mask import MaskFn as MaskFn
from afbs_jax.attention.dense import DenseAttention as DenseAttention
from afbs_jax.attention.method import TunedAttention as TunedAttention
from afbs_jax.attention.policy import check_qkv as check_qkv
from afbs_jax.attention.sparge import SpargeAttention as SpargeAttention
