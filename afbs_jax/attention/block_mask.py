"""Block-sparse attention under a block mask computed by a function (fixed baselines, oracles)."""

from __future__ import annotations

from collections.abc import Callable

import jax

from afbs_jax.attention.policy import check_qkv
from kernels.block_config import BlockSparseConfig

MaskFn = Callable[[jax.Array, jax.Array, int], jax.Array]


@jax.tree_util.register_pytree_node_class
class BlockMaskAttention:
  """Block-sparse attention under an externally computed block mask (for baselines).

  `mask_fn(q, k, layer)` returns bool [batch, heads, n_q_blocks, n_k_blocks]; it is static (hashed by
  identity), so one function object compiles once. Causal validity is ANDed in by the kernel.
  """

  def __init__(self, mask_fn: MaskFn, *, block_q: int, block_k: int, backend: str = "auto"):
    if not callable(mask_fn):
      raise ValueError(f"mask_fn must be callable (q, k, layer) -> bool mask; got {mask_fn!r}")
    self.mask_fn = mask_fn
    self.blocks = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=True, backend=backend)

  block_q = property(lambda self: self.blocks.block_q)
  block_k = property(lambda self: self.blocks.block_k)
  backend = property(lambda self: self.blocks.backend)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int,
               q_positions: jax.Array | None = None) -> jax.Array:
    check_qkv(q, k, v)
    if q_positions is not None:
      raise NotImplementedError("BlockMaskAttention attends in prefill only (queries are the last T keys)")
    mask = self.mask_fn(q, k, layer)
    expected = (q.shape[0], q.shape[2], *self.blocks.num_blocks(q.shape[1], k.shape[1]))
    if tuple(mask.shape) != expected:
      raise ValueError(f"mask_fn returned a mask of shape {tuple(mask.shape)} for layer {layer}; expected "
                       f"[batch, heads, n_q_blocks, n_k_blocks]={expected}")
    from kernels import block_sparse  # Lazily, as in MaskMethod.attend.

    return block_sparse.run_block_sparse(q, k, v, mask, self.blocks)[0]

  def tree_flatten(self):
    return (), (self.mask_fn, self.blocks)

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    del children
    policy = object.__new__(cls)
    policy.mask_fn, policy.blocks = aux_data
    return policy

  def __repr__(self) -> str:
    return f"BlockMaskAttention({self.mask_fn!r}, block_q={self.block_q}, block_k={self.block_k})"
