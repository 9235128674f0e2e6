"""SpargeAttn's stage-1 mask predictor in jitted jnp: which (q block, key block) tiles attention computes.

Q and (mean-centred) K are mean-pooled per block; pooled scores q̄·k̄/√D give a per-row softmax over key
blocks, and each row keeps its most probable blocks until their cumulative mass would pass τ (top-CDF),
at least one. Blocks whose tokens point in different directions (self-similarity ≤ θ) are not trusted to
their mean: such key blocks are computed for every row and such query blocks compute every key block.
Everything is batched over heads with per-head τ, θ as traced arrays, so one compilation serves every
parameter value a tuner tries. Two exact shortcuts keep it cheap next to attention: on GPU the block
statistics are one Pallas pass over Q and K (XLA needs three), and a causal square mask sorts rows i and
n-1-i together, halving the per-row top-CDF sort. `kernels.sparge` documents the semantics and the
differences from SpargeAttn.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from kernels.block_index import causal_block_mask as causal_block_mask


def _block_sums_jnp(x: jax.Array, centre: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Per-block Σ_t x_t and Σ_t (x_t − c)/||x_t − c|| over valid tokens, in plain jnp (three passes over x).

  Args:
    x: [batch, seq, heads, head_dim] in its input dtype (converted to f32 inside each reduction, so no
      f32 copy of the whole tensor is ever written).
    centre: f32 [batch, 1, heads, head_dim].
    block: tokens per block; the last block may be partial.

  Returns:
    sums, unit_sums: f32 [batch, n_blocks, heads, head_dim].
  """
  batch, seq, heads, head_dim = x.shape
  n_blocks = math.ceil(seq / block)
  squared_norm = jnp.sum(jnp.square(x.astype(jnp.float32) - centre), axis=-1, keepdims=True)
  inverse_norm = jnp.where(squared_norm > 0, jax.lax.rsqrt(jnp.where(squared_norm > 0, squared_norm, 1.0)),
                           0.0)
  # Padding past `seq` must add nothing: raw tokens pad with 0 and inverse norms pad with 0.
  if seq % block:
    pad = ((0, 0), (0, n_blocks * block - seq), (0, 0), (0, 0))
    x, inverse_norm = jnp.pad(x, pad), jnp.pad(inverse_norm, pad)
  x_blocks = x.reshape(batch, n_blocks, block, heads, head_dim).astype(jnp.float32)
  inverse_blocks = inverse_norm.reshape(batch, n_blocks, block, heads, 1)
  sums = x_blocks.sum(axis=2)
  unit_sums = ((x_blocks - centre[:, None]) * inverse_blocks).sum(axis=2)
  return sums, unit_sums


def _block_sums_kernel(x_ref, centre_ref, sums_ref, unit_sums_ref, *, block: int, seq: int):
  """One (batch, block, head) program: both block sums from a single read of the [block, head_dim] tile."""
  x = x_ref[...].astype(jnp.float32)
  token = pl.program_id(1) * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
  centred = jnp.where(token < seq, x - centre_ref[...][None, :], 0.0)
  squared_norm = jnp.sum(centred * centred, axis=1, keepdims=True)
  inverse_norm = jnp.where(squared_norm > 0, jax.lax.rsqrt(jnp.where(squared_norm > 0, squared_norm, 1.0)),
                           0.0)
  sums_ref[...] = jnp.sum(x, axis=0)
  unit_sums_ref[...] = jnp.sum(centred * inverse_norm, axis=0)


def _block_sums_fused(x: jax.Array, centre: jax.Array, block: int, *, interpret: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
  """`_block_sums_jnp` as one Pallas (Triton) pass over x: the jnp version reads x three times."""
  batch, seq, heads, head_dim = x.shape
  n_blocks = math.ceil(seq / block)
  # Triton tiles need power-of-two extents; zero tokens and zero features change neither sum.
  width = pl.next_power_of_2(head_dim)
  x = jnp.pad(x, ((0, 0), (0, n_blocks * block - seq), (0, 0), (0, width - head_dim)))
  centre = jnp.pad(centre, ((0, 0), (0, 0), (0, 0), (0, width - head_dim)))
  sum_spec = pl.BlockSpec((None, None, None, width), lambda b, n, h: (b, n, h, 0))
  sum_shape = jax.ShapeDtypeStruct((batch, n_blocks, heads, width), jnp.float32)
  sums, unit_sums = pl.pallas_call(
      functools.partial(_block_sums_kernel, block=block, seq=seq),
      grid=(batch, n_blocks, heads),
      in_specs=[pl.BlockSpec((None, block, None, width), lambda b, n, h: (b, n, h, 0)),
                pl.BlockSpec((None, None, None, width), lambda b, n, h: (b, 0, h, 0))],
      out_specs=[sum_spec, sum_spec],
      out_shape=[sum_shape, sum_shape],
      interpret=interpret,
      name=f"sparge_block_sums_{block}",
  )(x, centre)
  return sums[..., :head_dim], unit_sums[..., :head_dim]


def _block_statistics(x: jax.Array, block: int, centre: jax.Array | None = None, *, fused: bool = False,
                      interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Per-block mean and self-similarity over the block's valid tokens of x - centre.

  Args:
    x: [batch, seq, heads, head_dim] in its input dtype.
    block: tokens per block; the last block may be partial.
    centre: optional f32 [batch, 1, heads, head_dim] subtracted from every token.
    fused: compute the block sums with the one-pass Pallas kernel (GPU, or CPU with `interpret`).

  Returns:
    pooled: f32 [batch, heads, n_blocks, head_dim], the mean (centred) token of each block.
    similarity: f32 [batch, heads, n_blocks], ||mean_t(x_t / ||x_t||)||^2, the mean pairwise cosine
      including self-pairs; a zero token counts in the mean but adds nothing to it.
  """
  batch, seq, heads, head_dim = x.shape
  valid = np.minimum(block, seq - np.arange(math.ceil(seq / block)) * block).astype(np.float32)
  centre = jnp.zeros((batch, 1, heads, head_dim), jnp.float32) if centre is None else centre
  if fused:
    sums, unit_sums = _block_sums_fused(x, centre, block, interpret=interpret)
  else:
    sums, unit_sums = _block_sums_jnp(x, centre, block)
  # Only [.., n_blocks, ..] arrays from here on.
  pooled = sums.transpose(0, 2, 1, 3) / valid[:, None] - centre.transpose(0, 2, 1, 3)
  unit_sums = unit_sums.transpose(0, 2, 1, 3)
  return pooled, jnp.sum(unit_sums * unit_sums, axis=-1) / valid**2


def _per_head(value: Any, heads: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (heads,))


def _masked_softmax(scores: jax.Array, allowed: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `allowed`; a row with nothing allowed is all zeros."""
  scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.where(allowed.any(-1, keepdims=True), scores.max(axis=-1, keepdims=True), 0.0)
  weights = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
  total = weights.sum(axis=-1, keepdims=True)
  return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)


def _top_cdf(probs: jax.Array, tau: jax.Array) -> jax.Array:
  """Keeps each row's most probable blocks while their inclusive cumulative mass stays <= τ, at least one.

  Args:
    probs: f32 [batch, heads, n_q_blocks, n_k_blocks], rows sum to 1 (or 0 when nothing is allowed).
    tau: f32 [heads].

  Returns:
    bool like `probs`: blocks whose probability reaches the n-th largest of the row, with
    n = max(1, #{r : cdf_r <= τ}); blocks tied with the n-th are all kept.
  """
  descending = -jnp.sort(-probs, axis=-1)
  cdf = jnp.cumsum(descending, axis=-1)
  n_keep = jnp.maximum(1, jnp.sum(cdf <= tau[:, None, None], axis=-1))
  threshold = jnp.take_along_axis(descending, (n_keep - 1)[..., None], axis=-1)
  return probs >= threshold


_SECOND_SEGMENT = 1 << 30   # added to the second segment's f32 bit patterns; 2^30 + bits(1.0) < 2^31
_EMPTY_SLOT = np.iinfo(np.int32).max


@functools.lru_cache(maxsize=None)
def _causal_square_layout(n: int) -> dict[str, np.ndarray]:
  """Static tables that pack the lower triangle of an n × n matrix (n even) into n/2 + 1 rows of width n.

  Row i has i + 1 entries, so rows r and n-2-r (r < n/2 - 1) fill one packed row exactly; rows n/2 - 1 and
  n - 1 get a packed row each. Keeping the width at n (not n + 1) keeps the sort at a power of two.
  """
  pairs = [(r, n - 2 - r) for r in range(n // 2 - 1)] + [(n // 2 - 1, None), (n - 1, None)]
  rows = np.zeros((len(pairs), n), np.int32)
  columns = np.zeros((len(pairs), n), np.int32)
  segment = np.full((len(pairs), n), 2, np.int32)                      # 0 first, 1 second, 2 empty
  first_length = np.array([first + 1 for first, _ in pairs], np.int32)
  second_length = np.array([0 if second is None else second + 1 for _, second in pairs], np.int32)
  source = np.zeros((n, 2), np.int32)                                  # original row -> (packed row, segment)
  for packed_row, (first, second) in enumerate(pairs):
    for seg, original in enumerate((first, second)):
      if original is None:
        continue
      start = 0 if seg == 0 else first_length[packed_row]
      rows[packed_row, start:start + original + 1] = original
      columns[packed_row, start:start + original + 1] = np.arange(original + 1)
      segment[packed_row, start:start + original + 1] = seg
      source[original] = (packed_row, seg)
  return dict(rows=rows, columns=columns, segment=segment, first_length=first_length,
              second_length=second_length, source=source)


def _top_cdf_causal_square(probs: jax.Array, tau: jax.Array) -> jax.Array:
  """`_top_cdf` for a lower-triangular support (causal, T == S, block_q == block_k, even n) at half the sort.

  Two rows share each packed row (see `_causal_square_layout`); the second row's f32 bit patterns are
  offset by 2^30 (non-negative floats order like their bits), so one ascending sort orders both
  segments, each in place. Each segment then gets its own inclusive top-down CDF.

  Args:
    probs: f32 [batch, heads, n, n], zero above the diagonal.
    tau: f32 [heads].

  Returns:
    bool like `probs`, as `_top_cdf` on the causal blocks (it may keep zeros above the diagonal too).
  """
  layout = _causal_square_layout(probs.shape[-1])
  segment = layout["segment"]
  packed = probs[..., layout["rows"], layout["columns"]]               # [batch, heads, n/2 + 1, n]
  bits = jax.lax.bitcast_convert_type(packed, jnp.int32)
  keys = jnp.sort(jnp.where(segment == 2, _EMPTY_SLOT, bits + segment * _SECOND_SEGMENT), axis=-1)
  # After the sort each packed row is [first segment | second segment | empty], ascending within each.
  position = np.arange(segment.shape[-1])[None, :]
  first_end = layout["first_length"][:, None]
  second_end = first_end + layout["second_length"][:, None]
  sorted_segment = np.where(position < first_end, 0, np.where(position < second_end, 1, 2))
  ascending = jax.lax.bitcast_convert_type(
      jnp.where(sorted_segment == 2, 0, keys - sorted_segment * _SECOND_SEGMENT), jnp.float32)
  # One top-down cumsum serves both segments: the second segment (and the empty slots, zeros) come last,
  # so the first segment's sums carry the second's total on top, which its bound carries too.
  suffix = jnp.cumsum(ascending[..., ::-1], axis=-1)[..., ::-1]
  second_total = jnp.where(position == first_end, suffix, 0.0).sum(axis=-1, keepdims=True)
  bound = tau[:, None, None] + jnp.where(sorted_segment == 0, second_total, 0.0)
  within = suffix <= bound
  thresholds = []
  for seg, end in ((0, first_end[:, 0]), (1, second_end[:, 0])):
    n_keep = jnp.maximum(1, jnp.sum(within & (sorted_segment == seg), axis=-1))
    # Ascending order: the segment's n-th largest sits n places before its end (clipped for empty rows).
    index = jnp.clip(end - n_keep, 0, segment.shape[-1] - 1)
    thresholds.append(jnp.take_along_axis(ascending, index[..., None], axis=-1)[..., 0])
  thresholds = jnp.stack(thresholds, axis=-1)                          # [batch, heads, n/2 + 1, 2]
  threshold = thresholds[..., layout["source"][:, 0], layout["source"][:, 1]]
  return probs >= threshold[..., None]


def invalid_thresholds(tau: jax.Array, theta: jax.Array) -> jax.Array:
  """bool [heads]: τ NaN or outside [0, 1], or θ NaN (τ, θ: f32 [heads])."""
  return jnp.isnan(tau) | (tau < 0) | (tau > 1) | jnp.isnan(theta)


def valid_thresholds(tau: jax.Array, theta: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(τ, θ) with every invalid head's pair replaced by the dense-equivalent one: τ = 1, θ = +inf."""
  invalid = invalid_thresholds(tau, theta)
  return jnp.where(invalid, 1.0, tau), jnp.where(invalid, jnp.inf, theta)


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "attention_sink"))
def predict_block_mask(q: jax.Array, k: jax.Array, params: Any, *, causal: bool = True, block_q: int = 64,
                       block_k: int = 64, attention_sink: bool = False) -> jax.Array:
  """Predicts SpargeAttn's block mask from pooled Q and K, per head with its own τ and θ.

  Inputs are not validated here; `kernels.sparge.predict_block_mask` is the checked public entry.

  Args:
    q: [batch, T, heads, head_dim].
    k: [batch, S, kv_heads, head_dim]; query head h reads kv head h // (heads // kv_heads).
    params: anything with `tau` and `theta` attributes (e.g. `SpargeParams`), each a scalar or [heads];
      τ in [0, 1] (τ >= 1 keeps every allowed block), θ any real (θ < 0 trusts every block, θ >= 1 none).
    causal: bottom-right aligned causal masking; causal-invalid blocks are never kept.
    block_q, block_k: block sizes (static).
    attention_sink: also keep key block 0 in every row that has any causal-valid block.

  Returns:
    bool [batch, heads, ceil(T / block_q), ceil(S / block_k)].
  """
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  # A boolean mask has no gradient; cutting q and k here also keeps differentiation out of the fused
  # Pallas statistics pass (a pallas_call with program_id has no JVP rule on GPU).
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  tau, theta = _per_head(params.tau, heads), _per_head(params.theta, heads)
  # Traced values escape the front door's checks: a head whose τ or θ is invalid keeps every block.
  tau, theta = valid_thresholds(tau, theta)
  # Centring K leaves each row's softmax unchanged but makes its self-similarity meaningful.
  k_mean = jnp.mean(k, axis=1, keepdims=True, dtype=jnp.float32)
  # On GPU one Pallas pass per tensor replaces XLA's three; the jnp path defines the same numbers.
  fused = jax.default_backend() == "gpu"
  q_pooled, q_similarity = _block_statistics(q, block_q, fused=fused)
  k_pooled, k_similarity = _block_statistics(k, block_k, centre=k_mean, fused=fused)
  n_q, n_k = q_pooled.shape[2], k_pooled.shape[2]

  # GQA: group the query heads of each kv head instead of repeating K. [b, kv, g, n_q, n_k]
  scores = jnp.einsum("bkgid,bkjd->bkgij", q_pooled.reshape(batch, kv_heads, group, n_q, head_dim),
                      k_pooled, precision=jax.lax.Precision.HIGHEST) / math.sqrt(head_dim)
  scores = scores.reshape(batch, heads, n_q, n_k)
  k_similarity = jnp.repeat(k_similarity, group, axis=1)          # [batch, heads, n_k], tiny
  q_similar = q_similarity > theta[:, None]                        # [batch, heads, n_q]
  k_similar = k_similarity > theta[:, None]                        # [batch, heads, n_k]
  causal_valid = causal_block_mask(q_len, kv_len, causal=causal, block_q=block_q, block_k=block_k)

  # Non-similar key blocks and causal-invalid blocks leave the softmax (and so the CDF).
  allowed = causal_valid & k_similar[:, :, None, :]
  probs = _masked_softmax(scores, allowed)
  square = causal and q_len == kv_len and block_q == block_k and n_q % 2 == 0
  keep = _top_cdf_causal_square(probs, tau) if square else _top_cdf(probs, tau)
  # τ >= 1 keeps every allowed block outright, so rounding in the cumsum can never drop one.
  keep |= (tau >= 1.0)[:, None, None] & allowed
  keep |= ~k_similar[:, :, None, :] | ~q_similar[:, :, :, None]
  if attention_sink:
    keep = keep.at[..., 0].set(True)
  return keep & causal_valid
