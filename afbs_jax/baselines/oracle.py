"""Oracles that read the true attention: `topk_token` (per query, its top keys by logit) and `topk_block`
(per query block, its key blocks with the most true attention mass).

They are upper bounds a predictor can only approach: selecting needs the full [batch, heads, T, S]
attention they are meant to avoid (here `query_chunk` query rows at a time, so never all of it at once).
Ranking by logit is ranking by probability, since softmax is monotone within a row.
"""

from __future__ import annotations

import functools
import math

import jax

from afbs_jax.baselines.chunks import chunk_size, join_chunks, scan_chunks
from afbs_jax.baselines.features import logits, masked_probs
from afbs_jax.baselines.policy import QUERY_CHUNK, BlockPolicy, TokenPolicy, baseline
from afbs_jax.baselines.sparsity import block_sum
from kernels.block_config import check_block_size


@baseline
class TopKToken(TokenPolicy):
  """Per query, its diagonal and its top keys by true attention. Sparsity knob: k (k or k + 1 per row)."""

  name = "topk_token"

  def chunk_scores(self, q_rows, k, chunk, context, carry):
    del chunk, context
    return logits(q_rows, k), carry


@baseline
class TopKBlock(BlockPolicy):
  """Per query block, its diagonal block and the key blocks holding the most true attention mass (summed
  probabilities of the tile). Sparsity knob: k (k or k + 1 blocks per row).

  Attributes:
    query_chunk: query rows whose probabilities exist at once (a power of two >= 16; at least one block).
  """

  name = "topk_block"
  traceable = True
  query_chunk: int = QUERY_CHUNK

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "query_chunk", check_block_size("query_chunk", self.query_chunk))

  def scores(self, q, k, grid, counts, layer):
    del grid, counts, layer
    return block_mass(q, k, block=self.block_size, query_chunk=self.query_chunk)


@functools.partial(jax.jit, static_argnames=("block", "query_chunk"))  # Eagerly: one compile per shape.
def block_mass(q: jax.Array, k: jax.Array, block: int, query_chunk: int) -> jax.Array:
  """`block_sum(causal_probs(q, k), block)`, f32 [batch, heads, n_q_blocks, n_k_blocks], from chunks of
  whole query blocks (`query_chunk` rows, at least one block)."""
  size = chunk_size(q.shape[1], query_chunk, block)
  step = lambda carry, q_rows, chunk: (carry, block_sum(masked_probs(q_rows, k, chunk.valid), block))
  _, mass = scan_chunks(step, None, q, k.shape[1], size)
  return join_chunks(mass, 2, math.ceil(q.shape[1] / block))
