"""The decode-phase sparse-attention front door: a query chunk against the kept blocks of a KV cache.

`decode_sparse_attention` checks its inputs before tracing, picks each (batch, query head)'s kept key
blocks from the mean-pooled cache blocks and the chunk's mean query (τ top-CDF: besides the forced
blocks, the fewest candidates whose share of the candidates' pooled mass reaches τ, top-p over
SpargeAttn's scores; or a fixed top-k budget; per head; the blocks holding the chunk and, by default,
block 0 are forced, always kept),
lists them and runs attention over them only: the Pallas kernel of `kernels.decode_sparse_triton`
(Triton on GPU, interpret mode with backend="interpret") or the jnp reference
(`kernels.decode_sparse_reference`, which documents the exact rule). On the kernel backends a small
Pallas kernel lists the kept blocks without a sort (selection="pallas_lists", the default,
`kernels.decode_select_triton`); selection="lists" ranks them with one XLA sort (`select_block_lists`),
selection="in_kernel" chooses inside the attention kernel itself. Decode sparsity is 1 − kept /
valid cache blocks. Everything per head (τ, k) may be traced, so one compilation serves every value; which
rule is used, the block size, the sink, the backend and the selection are static.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_config import check_block_size
from kernels.block_sparse import check_per_head, check_sm_scale, concrete
from kernels.decode_sparse_reference import (block_roles, block_scores, decode_attention_reference,
                                             key_block_means, kept_from_lists, select_block_lists,
                                             sparsity_from_counts)

DECODE_BACKENDS = ("auto", "triton", "interpret", "reference")
"""backend= values: "auto" is Triton on GPU and the reference elsewhere; "interpret" runs the Pallas
kernel in interpret mode (CPU, slow: for tests)."""
SELECTIONS = ("lists", "in_kernel", "pallas_lists")
"""selection= values, for the kernel backends: "lists" ranks the candidates in XLA (one sort,
`select_block_lists`) and the kernel walks the kept lists; "in_kernel" decides inside the attention kernel
(`kernels.decode_select_triton`: a threshold bisection, no sort, then a branch per cached block);
"pallas_lists" decides by the same rule in a small Pallas kernel that writes the kept lists
(`select_lists_triton`), which the list kernel walks. The two threshold rules keep the same blocks as the
sort except exact score ties (kept or dropped together) and τ within f32 rounding of a candidate's mass.
The reference ignores it."""
DEFAULT_SELECTION = "pallas_lists"
"""On an H200 it decoded fastest of the three in 10 of the 12 (model, batch, budget or τ) settings of one
`benchmarks.decode_bench` run and within 2 % of the XLA lists in the other two (`results/decode_bench.md`:
Llama-2-7B shape at 32K, batch 1, 1.09× / 1.37× / 1.61× dense tokens/s at 0.5 / 0.75 / 0.9 decode sparsity,
against the lists' 1.09× / 1.31× / 1.51× and in-kernel's 0.66× / 0.78× / 1.02×)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kept", "sparsity"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DecodeSparseStats:
  """Which cache blocks one decode call kept.

  Attributes:
    kept: bool [batch, heads, max_len // block_size], a subset of the valid (filled) blocks.
    sparsity: f32 [batch, heads], 1 − kept / valid blocks.
  """
  kept: jax.Array
  sparsity: jax.Array


# ----------------------------------------------------------------------------------------------------
# Checks, before tracing; value checks only where the values are concrete.


def _check_arrays(q: Any, k_cache: Any, v_cache: Any, lengths: Any, block_size: int) -> None:
  named = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
  for name, x in named.items():
    if not hasattr(x, "shape") or len(x.shape) != 4:
      layout = "[batch, q_len, heads, head_dim]" if name == "q" else "[batch, max_len, kv_heads, head_dim]"
      raise ValueError(f"{name} must be a 4-d array {layout}; got shape "
                       f"{getattr(x, 'shape', type(x).__name__)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype; got {x.dtype}.")
    if min(x.shape) < 1:
      raise ValueError(f"{name} must have no empty axis; got shape {tuple(x.shape)}.")
  if len({jnp.dtype(x.dtype) for x in named.values()}) > 1:
    given = ", ".join(f"{name} {jnp.dtype(x.dtype).name}" for name, x in named.items())
    raise ValueError(f"q, k_cache and v_cache must share one floating dtype; got {given}. Cast them (the "
                     "cache is in the model's param dtype) to one dtype first.")
  batch, q_len, heads, head_dim = q.shape
  _, max_len, kv_heads, _ = k_cache.shape
  if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
    raise ValueError(f"k_cache must be [batch={batch}, max_len, kv_heads, head_dim={head_dim}] to match q "
                     f"{tuple(q.shape)}; got {tuple(k_cache.shape)}.")
  if tuple(v_cache.shape) != tuple(k_cache.shape):
    raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}; got {tuple(v_cache.shape)}.")
  if heads % kv_heads:
    raise ValueError(f"q heads ({heads}) must be a multiple of the cache's kv_heads ({kv_heads}).")
  if max_len % block_size:
    raise ValueError(f"block_size={block_size} must divide the cache's max_len={max_len}; allocate the "
                     f"cache in multiples of block_size.")
  if q_len > block_size:
    raise ValueError(f"q_len={q_len} must be at most block_size={block_size} (a decode chunk); run a "
                     "longer chunk through the prefill path.")
  if getattr(lengths, "shape", np.shape(lengths)) != (batch,):
    raise ValueError(f"lengths must be an int array of shape (batch,)=({batch},); got shape "
                     f"{getattr(lengths, 'shape', np.shape(lengths))}.")
  dtype = lengths.dtype if hasattr(lengths, "dtype") else np.asarray(lengths).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"lengths must have an integer dtype; got {dtype}.")
  values = concrete(lengths)
  if values is not None and (np.any(values < q_len) or np.any(values > max_len)):
    raise ValueError(f"lengths (filled slots, the chunk included) must lie in [q_len={q_len}, "
                     f"max_len={max_len}]; got {values}.")


def _check_rule(tau: Any, top_k: Any, heads: int) -> None:
  if (tau is None) == (top_k is None):
    raise ValueError("give exactly one of tau (top-CDF mass in (0, 1], per head) and top_k (kept blocks "
                     f"besides the forced ones, >= 1, per head); got {tau=}, {top_k=}.")
  if tau is not None:
    check_per_head("tau", tau, heads, (-math.inf, math.inf))
    values = concrete(tau)
    if values is not None and (np.any(values <= 0) or np.any(values > 1)):
      raise ValueError(f"tau must lie in (0, 1] (1 keeps every block); got {values}.")
    return
  shape = tuple(getattr(top_k, "shape", np.shape(top_k)))
  if shape not in ((), (heads,)):
    raise ValueError(f"top_k must be an int or have shape ({heads},) (one per query head); got shape {shape}.")
  dtype = top_k.dtype if hasattr(top_k, "dtype") else np.asarray(top_k).dtype
  if not jnp.issubdtype(dtype, jnp.integer) or dtype == np.bool_:
    raise ValueError(f"top_k must be an integer (blocks per head); got dtype {dtype}.")
  values = concrete(top_k)
  if values is not None and np.any(values < 1):
    raise ValueError(f"top_k must be >= 1 (the forced blocks are kept on top of it); got {values}.")


def _check_key_means(key_means: Any, expected: tuple[int, ...]) -> None:
  if key_means is not None and tuple(getattr(key_means, "shape", ())) != expected:
    raise ValueError(f"key_means must be f32 [batch, n_blocks, kv_heads, head_dim]={expected} "
                     f"(`key_block_means`); got shape {getattr(key_means, 'shape', None)}.")


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """The backend that runs: "auto" is "triton" on GPU and "reference" elsewhere."""
  if backend not in DECODE_BACKENDS:
    raise ValueError(f"backend must be one of {DECODE_BACKENDS}; got {backend!r}.")
  platform = platform or jax.default_backend()
  if backend == "auto":
    return "triton" if platform == "gpu" else "reference"
  if backend == "triton" and platform != "gpu":
    raise ValueError(f"backend='triton' needs a GPU, but the default platform is {platform!r}; use "
                     "backend='interpret' to run the same kernel on CPU, or 'auto'.")
  return backend


# ----------------------------------------------------------------------------------------------------
# The jitted call.


@functools.partial(jax.jit, static_argnames=("block_size", "sm_scale", "sink", "backend", "num_splits",
                                             "selection"))
def _decode(q, k_cache, v_cache, lengths, tau, top_k, key_means, *, block_size: int, sm_scale: float,
            sink: bool, backend: str, num_splits: int, selection: str) -> tuple[jax.Array, DecodeSparseStats]:
  heads = q.shape[2]
  tau = None if tau is None else jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (heads,))
  top_k = None if top_k is None else jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (heads,))
  if selection != "lists" and backend != "reference":   # the threshold rule, in a Pallas kernel
    from kernels import decode_select_triton as select_lib  # Pallas only when it runs
    if key_means is None:
      key_means = key_block_means(k_cache, lengths, block_size)
    scores = block_scores(q, key_means, sm_scale)                                   # [B, H, n_blocks]
    budget, rule = (top_k, "top_k") if tau is None else (tau, "tau")
    valid = block_roles(jnp.arange(scores.shape[-1])[None, :], lengths[:, None], q_len=q.shape[1],
                        block_size=block_size, sink=sink)[0]
    if selection == "in_kernel":
      out, kept = select_lib.decode_select_attention_triton(
          q, k_cache, v_cache, lengths, scores, budget, rule=rule, block_size=block_size, sm_scale=sm_scale,
          sink=sink, interpret=backend == "interpret", num_splits=num_splits)
      return out, DecodeSparseStats(kept=kept, sparsity=sparsity_from_counts(
          jnp.sum(kept, axis=-1, dtype=jnp.int32), valid))
    indices, counts = select_lib.select_lists_triton(scores, budget, lengths, rule=rule, q_len=q.shape[1],
                                                     block_size=block_size, sink=sink,
                                                     interpret=backend == "interpret")
  else:
    indices, counts, valid = select_block_lists(q, k_cache, lengths, tau=tau, top_k=top_k, block_size=block_size,
                                                sm_scale=sm_scale, sink=sink, key_means=key_means)
  kept = kept_from_lists(indices, counts)   # for the stats and the reference; XLA drops it when unread
  if backend == "reference":
    out = decode_attention_reference(q, k_cache, v_cache, lengths, kept, block_size=block_size,
                                     sm_scale=sm_scale)
  else:
    from kernels.decode_sparse_triton import decode_sparse_attention_triton  # Pallas only when it runs
    out = decode_sparse_attention_triton(q, k_cache, v_cache, lengths, indices, counts, block_size=block_size,
                                         sm_scale=sm_scale, interpret=backend == "interpret",
                                         num_splits=num_splits)
  return out, DecodeSparseStats(kept=kept, sparsity=sparsity_from_counts(counts, valid))


def suggested_num_splits(batch: int, heads: int, n_blocks: int, *, programs: int = 132) -> int:
  """Key-range splits per (batch, head) so that batch · heads · splits programs about fill `programs`
  (an H100/H200 has 132 SMs), at least 4 blocks per split and at most 16 splits; 1 when batch · heads
  already fills half of them. Flash-decoding's split-K: at batch 1 a 9-head model runs 9 programs
  otherwise. The half: on the H200 (results/decode_bench.md, top-k at 0.9 decode sparsity) splitting
  won end to end at 9 programs (SmolLM2, batch 1) and 32 (Llama-2-7B shape, batch 1: 154 against 116
  tokens/s) but lost at 72 (SmolLM2, batch 8: 3,191 against 3,581 tokens/s)."""
  if min(batch, heads, n_blocks) < 1:
    raise ValueError(f"batch, heads and n_blocks must be >= 1; got {batch}, {heads}, {n_blocks}")
  if batch * heads >= programs // 2:
    return 1
  return int(max(1, min(16, n_blocks // 4, programs // (batch * heads))))


def decode_sparse_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                            tau: jax.Array | float | None = None, top_k: jax.Array | int | None = None,
                            block_size: int = 64, sink: bool = True, backend: str = "auto",
                            sm_scale: float | None = None, key_means: jax.Array | None = None,
                            return_stats: bool = False, num_splits: int | None = None,
                            selection: str = DEFAULT_SELECTION) -> jax.Array | tuple[jax.Array, DecodeSparseStats]:
  """Attention of the newest T tokens' queries over the kept key blocks of their KV cache.

  Args:
    q: [batch, T, heads, head_dim], 1 <= T <= block_size, the queries at positions lengths − T …
      lengths − 1 (post-RoPE); their K/V must already be written to the cache.
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim], q's dtype, heads % kv_heads == 0; slots at
      or past a sequence's length never reach the result (garbage there, NaN included, is harmless).
    lengths: int [batch], filled slots per sequence, T <= lengths <= max_len (ragged).
    tau: τ top-CDF mass, a scalar or [heads] in (0, 1] (1 keeps every block); may be traced.
    top_k: blocks kept by score besides the forced ones, an int or int [heads] >= 1; may be traced.
      Exactly one of tau and top_k.
    block_size: slots per key block, a power of two >= 16 that divides max_len.
    sink: always keep block 0 (the blocks holding the chunk are always kept).
    backend: one of `DECODE_BACKENDS`.
    sm_scale: logit scale, 1/sqrt(head_dim) when None.
    key_means: `kernels.decode_sparse_reference.key_block_means(k_cache, lengths, block_size)`, if the
      caller maintains it: `block_means` of the running `key_block_sums` that `afbs_jax.model.cache`
      keeps, so a step need not re-read every key (bit-identical, hence the same selection); computed
      from the cache when None.
    return_stats: also return `DecodeSparseStats` (kept blocks, sparsity).
    num_splits: the kernel backends' split-K: each (batch, head)'s kept blocks are cut into this many
      contiguous parts, each walked by its own program, and the parts' softmax statistics merged
      (flash-decoding); None (the default) picks `suggested_num_splits`; 1 is one program per (batch,
      head). The result is the same up to f32 rounding; the reference ignores it. With
      selection="in_kernel" the valid blocks, not the kept list, are cut into the parts.
    selection: one of `SELECTIONS`: "pallas_lists" (the default) chooses by a threshold rule in a small
      Pallas kernel that writes the kept lists the list kernel walks; "lists" ranks the candidates in XLA
      (one sort) for the same kernel; "in_kernel" chooses inside the attention kernel. The reference backend
      ignores it.

  Returns:
    out [batch, T, heads, head_dim] in q.dtype, and the stats if asked.

  Raises:
    ValueError: a shape, dtype or value outside what is listed above (values only when concrete).
  """
  block_size = check_block_size("block_size", block_size)
  _check_arrays(q, k_cache, v_cache, lengths, block_size)
  _check_rule(tau, top_k, q.shape[2])
  check_sm_scale(sm_scale)
  if not isinstance(sink, bool):
    raise ValueError(f"sink must be a bool; got {sink!r}.")
  batch, _, _, head_dim = q.shape
  _check_key_means(key_means, (batch, k_cache.shape[1] // block_size, k_cache.shape[2], head_dim))
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
  n_blocks = k_cache.shape[1] // block_size
  if num_splits is None:
    num_splits = suggested_num_splits(batch, q.shape[2], n_blocks)
  if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or not 1 <= num_splits <= n_blocks:
    raise ValueError(f"num_splits must be an integer in [1, {n_blocks}] (the cache's blocks) or None; "
                     f"got {num_splits!r}.")
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}.")
  out, stats = _decode(q, k_cache, v_cache, jnp.asarray(lengths, jnp.int32), tau, top_k, key_means,
                       block_size=block_size, sm_scale=scale, sink=sink, backend=resolve_backend(backend),
                       num_splits=int(num_splits), selection=selection)
  return (out, stats) if return_stats else out
