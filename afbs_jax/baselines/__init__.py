"""Sparse-attention baselines: attention policies built from a target sparsity, for the model's seam.

    policy = afbs_jax.baselines.get("window", sparsity=0.7, block_size=64, seed=0)
    mask = policy.token_mask(q, k)       # bool [batch, heads, T, S], causal applied
    out = policy(q, k, v, layer=0)       # what a model layer calls; model.with_attention(policy)
    out, sparsity = policy.attend(q, k, v, layer=0)   # plus the achieved sparsity, f32 [batch, heads]

q: [batch, T, heads, head_dim] (post-RoPE); k, v: [batch, S, kv_heads, head_dim], heads % kv_heads == 0;
causal masking is bottom-right aligned (query t sees key u iff u <= t + S − T); prefill only (a
`q_positions` call raises NotImplementedError). Policies are pytrees usable under jit whose configuration
is static; sparge_global, topk_block and vertical_slash also take the target as a jax f32 scalar, a traced
leaf (`get(name, sparsity=jnp.float32(0.7))`), so a model compiled at one target serves every target.

Sparsity (`afbs_jax.baselines.sparsity`): token sparsity = 1 − kept causal-valid (query, key) pairs /
causal-valid pairs; block sparsity = 1 − causal-valid block_size × block_size tiles touched by a kept pair
/ causal-valid tiles, per (batch, head). Block-level baselines are held to a block-sparsity target and run
the block-sparse kernel (`kernels.block_sparse.run_block_sparse`); token-level ones to a token-sparsity
target and run masked dense attention. Every baseline but `sparge_global` keeps each query's diagonal
(its own position) and meets its target by exact counting: round((1 − sparsity) · valid cells) kept,
each query row (or query block) taking k or k + 1 of them in its own priority order
(`afbs_jax.baselines.budget`); past the diagonal-only point the sparsity saturates. `sparge_global` keeps
what SpargeAttn's predictor keeps and meets its target on the mean over batch and heads.
Random choices (patterns, rotations, centroids) come from `seed`, per layer.

Name (level): what it keeps; its sparsity knob.
  window (block): the most recent key blocks, a band along the diagonal; the band width.
  longformer (block): a window plus the first key blocks as global tokens, grown together; both widths.
  sparse_transformer (block): Child et al.'s strided pattern, l local blocks and every l-th block back
    (l ≈ √n_k_blocks), taken alternately; how far down that order each row goes.
  streamingllm (block): the attention sink (key block 0) plus the most recent blocks; the recent window.
  h2o (token): recent keys plus heavy hitters by attention mass accumulated over earlier queries; the
    per-query budget, half each.
  sparse_sink (block): the sink block plus random key blocks; random blocks per row.
  random (block): random key blocks; random blocks per row.
  topk_token (token): oracle, each query's top keys by true attention; k per query.
  topk_block (block): oracle, each query block's key blocks with the most true attention mass; k per row.
  reformer (token): LSH buckets from random rotations, training-free (the paper trains for hashing);
    the per-query budget.
  routing (token): k-means clusters of q and k by a few Lloyd steps, training-free (the paper trains its
    centroids); the per-query budget.
  sparge_global (block): SpargeAttn with one (τ, θ, λ) for every head, τ bisected per call to the
    target; τ.
  vertical_slash (block): MInference's vertical and slash lines, found from the last query block's true
    attention; k per row. Registered for `get`, outside `NAMES` (Table I's sweep).
"""

from afbs_jax.baselines.policy import BaselinePolicy as BaselinePolicy
from afbs_jax.baselines.policy import BlockPolicy as BlockPolicy
from afbs_jax.baselines.policy import TokenPolicy as TokenPolicy
from afbs_jax.baselines.registry import NAMES as NAMES
from afbs_jax.baselines.registry import POLICIES as POLICIES
from afbs_jax.baselines.registry import get as get
from afbs_jax.baselines.sparsity import block_sparsity as block_sparsity
from afbs_jax.baselines.sparsity import token_sparsity as token_sparsity
