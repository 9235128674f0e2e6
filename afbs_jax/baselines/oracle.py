"""Oracles that read the true attention: `topk_token` (per query, its top keys by logit) and `topk_block`
(per query block, its key blocks with the most true attention mass).

They are upper bounds a predictor can only approach: selecting needs the full [batch, heads, T, S]
attention they are meant to avoid. Ranking by logit is ranking by probability, since softmax is
monotone within a row.
"""

from __future__ import annotations

from afbs_jax.baselines.features import causal_probs, logits
from afbs_jax.baselines.policy import BlockPolicy, TokenPolicy, baseline
from afbs_jax.baselines.sparsity import block_sum


@baseline
class TopKToken(TokenPolicy):
  """Per query, its diagonal and its top keys by true attention. Sparsity knob: k (k or k + 1 per row)."""

  name = "topk_token"

  def scores(self, q, k, grid, counts, layer):
    del grid, counts, layer
    return logits(q, k)


@baseline
class TopKBlock(BlockPolicy):
  """Per query block, its diagonal block and the key blocks holding the most true attention mass (summed
  probabilities of the tile). Sparsity knob: k (k or k + 1 blocks per row)."""

  name = "topk_block"

  def scores(self, q, k, grid, counts, layer):
    del grid, counts, layer
    return block_sum(causal_probs(q, k), self.block_size)
