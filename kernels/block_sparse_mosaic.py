"""Block-sparse flash attention with SpargeAttn's λ P·V skip, as a Pallas TPU (Mosaic) kernel.

Each (batch, head, q block) walks only its kept key blocks: the per-row kept-block lists from
`kernels.block_index.mask_to_kv_indices` are scalar-prefetched into SMEM, and the K/V index maps read them
so that every grid step DMAs the next kept block (as splash attention's `data_next` does). The online
softmax state (running max m, denominator l, accumulator acc) lives in f32 VMEM scratch; per tile the
kernel decides, exactly as the jnp reference `kernels.sparge_reference` does, whether the tile's P·V can be
skipped because every weight in it is below e^λ times its row's running max. On platforms other than TPU
the same kernel runs in Pallas interpret mode. A row whose q or kept K/V blocks hold a NaN or ±inf skips
nothing (the reference's rule for non-finite inputs). There is no backward kernel here: `jax.grad` through
`kernels.block_sparse` differentiates this backend with the VJP of the jnp reference.
"""

from __future__ import annotations

import functools
import json
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np

from kernels.block_index import nonfinite_kept_blocks

# A TPU vreg is 8 sublanes x 128 lanes (32-bit); block shapes are tiled on it.
NUM_SUBLANES = 8
NUM_LANES = 128


def _on_tpu() -> bool:
  return jax.default_backend() == "tpu"


def tpu_interpret_params(**kwargs):
  """`interpret=` value selecting Pallas' TPU simulator, whatever this jax release calls it.

  jax 0.10.x and 0.11.x name it `pltpu.InterpretParams`; releases before 0.7 named it
  `pltpu.TPUInterpretParams`. The simulator models SMEM/VMEM, the DMAs chosen by the index maps and the
  grid order, fills uninitialised scratch with NaN and raises on out-of-bounds reads: slower than the
  generic interpreter, but it checks what a real TPU would do.
  """
  params_cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)
  if params_cls is None:
    raise ValueError(f"jax {jax.__version__} has no TPU interpret mode; use interpret=True instead.")
  return params_cls(**kwargs)


def _interpret_mode(interpret):
  """The `interpret=` value for `pallas_call`.

  False compiles with Mosaic on a TPU and falls back to the generic interpreter (`interpret=True`, a jitted
  loop over the grid: fast enough for tests and CPU runs) elsewhere; True always interprets; an
  interpret-params object (see `tpu_interpret_params`) is passed through.
  """
  if isinstance(interpret, (bool, np.bool_)):
    return bool(interpret) or not _on_tpu()
  return interpret


def _check_block_sizes(block_q: int, block_k: int, *, compiling_for_tpu: bool) -> None:
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if not compiling_for_tpu:
    return
  if block_q % NUM_SUBLANES:
    raise ValueError(
        f"block_q={block_q} is not a multiple of {NUM_SUBLANES}: on a TPU the q tile [block_q, head_dim] "
        f"must cover whole sublanes. Use block_q in {{{NUM_SUBLANES}, 16, 32, ..., 128, ...}}.")
  if block_k % NUM_LANES:
    raise ValueError(
        f"block_k={block_k} is not a multiple of {NUM_LANES}: on a TPU the logits tile [block_q, block_k] "
        f"must cover whole lanes. Use block_k in {{{NUM_LANES}, 256, ...}}.")


def _check_shapes(q, k, v, kv_indices, kv_counts, lam, block_q: int, block_k: int) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 ([batch, seq, heads, head_dim]), got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}.")
  batch, q_len, heads, head_dim = q.shape
  if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(
        f"k and v must both be [batch={batch}, kv_len, kv_heads, head_dim={head_dim}], "
        f"got k {k.shape} and v {v.shape}.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}.")
  n_q_blocks, n_k_blocks = pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_k)
  expected = (batch, heads, n_q_blocks, n_k_blocks)
  if tuple(kv_indices.shape) != expected:
    raise ValueError(f"kv_indices must have shape [batch, heads, n_q_blocks, n_k_blocks]={expected}, "
                     f"got {tuple(kv_indices.shape)}.")
  if tuple(kv_counts.shape) != expected[:3]:
    raise ValueError(f"kv_counts must have shape [batch, heads, n_q_blocks]={expected[:3]}, "
                     f"got {tuple(kv_counts.shape)}.")
  if tuple(lam.shape) != (heads,):
    raise ValueError(f"lam must have shape [heads]=({heads},), got {tuple(lam.shape)}.")


def _smem_budget_bytes(compiling_for_tpu: bool) -> int:
  """SMEM the index lists may take: half a core's SMEM (the rest is Mosaic's), 1 MiB cores by default."""
  capacity = 1024 * 1024  # v4 and later; v2/v3 cores have 16 KiB
  if compiling_for_tpu:
    try:
      capacity = pltpu.get_tpu_info().smem_capacity_bytes
    except (AttributeError, ValueError):  # an older jax, or a chip this jax does not describe
      pass
  return capacity // 2


def _grid_width(kv_counts: jax.Array, n_k_blocks: int) -> int:
  """Grid steps per q block: the fullest row's count when counts are concrete, else every key block.

  Like splash attention's `_shrink_mask_info`, a narrower grid saves the steps that every row would
  spend idling past its count. At least one step is needed so that init and finalize run.
  """
  try:
    counts = np.asarray(kv_counts)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return n_k_blocks
  return max(1, min(n_k_blocks, int(counts.max(initial=0))))


def _block_sparse_kernel(
    # Scalar prefetch (SMEM).
    kv_indices_ref,  # int32 [batch * heads * n_q_blocks * grid_width], flattened row lists
    kv_counts_ref,  # int32 [batch * heads * n_q_blocks]
    lam_ref,  # f32 [heads]
    tainted_rows_ref,  # int32 [batch * heads * n_q_blocks], 1 where a kept block's K or V isn't finite
    # Inputs (VMEM tiles).
    q_ref,  # [block_q, head_dim]
    k_ref,  # [block_k, head_dim]
    v_ref,  # [block_k, head_dim]
    # Outputs.
    out_ref,  # [block_q, head_dim]
    pv_skipped_ref,  # int32 [1, NUM_LANES], the count replicated over lanes
    # Scratch.
    m_ref,  # f32 [block_q, NUM_LANES], running row max (lane-replicated)
    l_ref,  # f32 [block_q, NUM_LANES], running denominator (lane-replicated)
    acc_ref,  # f32 [block_q, head_dim]
    skipped_ref,  # int32 [1] in SMEM
    tainted_ref,  # int32 [1] in SMEM: this row reads a non-finite value, so it computes every kept tile
    *,
    causal: bool,
    block_q: int,
    block_k: int,
    sm_scale: float,
    q_len: int,
    kv_len: int,
    heads: int,
    n_q_blocks: int,
    grid_width: int,
):
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  row = (b * heads + h) * n_q_blocks + i

  @pl.when(j == 0)
  def init():
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)
    skipped_ref[0] = jnp.int32(0)
    # A tainted q block (a non-finite value in q or in a kept block's K/V; `kernels.block_sparse_reference`)
    # computes every kept tile and skips none.
    q_bad = jnp.max(jnp.where(jnp.isfinite(q_ref[...].astype(jnp.float32)), 0.0, 1.0)) > 0.0
    tainted_ref[0] = ((tainted_rows_ref[row] > 0) | q_bad).astype(jnp.int32)

  # Steps past the row's count see a repeated index, so the pipeline issues no new DMA; skip the body.
  @pl.when(j < kv_counts_ref[row])
  def visit():
    kv_block = kv_indices_ref[row * grid_width + j]
    tile = dict(q_block=i, kv_block=kv_block, causal=causal, block_q=block_q, block_k=block_k,
                q_len=q_len, kv_len=kv_len)
    visit_tile = functools.partial(_visit_block, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, skipped_ref,
                                   lam=lam_ref[h], tainted=tainted_ref[0] > 0,
                                   sm_scale=sm_scale, **tile)
    # Only tiles on the causal diagonal or the ragged edge pay for the element mask.
    needs_mask = _tile_needs_mask(**tile)
    pl.when(needs_mask)(functools.partial(visit_tile, masked=True))
    pl.when(jnp.logical_not(needs_mask))(functools.partial(visit_tile, masked=False))

  @pl.when(j == grid_width - 1)
  def finalize():
    l = l_ref[...][:, :1]
    # Rows that computed nothing (empty row, every element masked, or padding) have l = 0: output 0.
    # Only an exactly empty denominator does; a NaN one (non-finite inputs) stays NaN.
    safe_l = jnp.where(l == 0.0, 1.0, l)
    out_ref[...] = jnp.where(l == 0.0, 0.0, acc_ref[...] / safe_l).astype(out_ref.dtype)
    pv_skipped_ref[...] = jnp.full(pv_skipped_ref.shape, skipped_ref[0], jnp.int32)


def _unmasked_elements(q_block, kv_block, *, causal: bool, block_q: int, block_k: int, q_len: int,
                       kv_len: int) -> jax.Array:
  """bool [block_q, block_k]: which elements of the tile take part (in range and causally allowed)."""
  rows = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  cols = kv_block * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  unmasked = (rows < q_len) & (cols < kv_len)
  if causal:
    # Bottom-right alignment: the last query sees the last key even when q_len != kv_len.
    unmasked &= cols <= rows + (kv_len - q_len)
  return unmasked


def _tile_needs_mask(q_block, kv_block, *, causal: bool, block_q: int, block_k: int, q_len: int,
                     kv_len: int) -> jax.Array:
  """Scalar bool: whether any element of the tile is out of range or causally hidden."""
  inside = ((q_block + 1) * block_q <= q_len) & ((kv_block + 1) * block_k <= kv_len)
  if causal:
    # The tile's first row and last column form the element the causal mask hides first.
    inside &= (kv_block + 1) * block_k - 1 <= q_block * block_q + (kv_len - q_len)
  return jnp.logical_not(inside)


def _matmul_precision(dtype) -> lax.Precision:
  # f32 inputs must match the f32 reference to 1e-5, which the TPU's default one-pass bf16 MXU
  # precision would not; bf16 inputs are exact on the MXU either way.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _visit_block(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, skipped_ref, *, q_block, kv_block, lam,
                 tainted, causal: bool, block_q: int, block_k: int, sm_scale: float, q_len: int, kv_len: int,
                 masked: bool):
  """One kept tile: logits, the λ skip test, and (unless skipped) the online-softmax update.

  `masked=False` is only valid for tiles where every element takes part (see `_tile_needs_mask`).
  `tainted`: the row reads a non-finite value somewhere: never skip, always compute.
  """
  q = q_ref[...]
  k = k_ref[...]
  # [block_q, block_k] = q [block_q, head_dim] . k^T, accumulated in f32 on the MXU.
  logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=_matmul_precision(q.dtype))
  logits = sm_scale * logits
  if masked:
    unmasked = _unmasked_elements(q_block, kv_block, causal=causal, block_q=block_q, block_k=block_k,
                                  q_len=q_len, kv_len=kv_len)
    logits = jnp.where(unmasked, logits, -jnp.inf)

  m_prev = m_ref[...][:, :1]  # [block_q, 1]
  tile_max = jnp.max(logits, axis=1, keepdims=True)  # [block_q, 1]; -inf where the row has nothing
  takes_part = tile_max > -jnp.inf
  # tile_max - m_prev is +inf for a row's first computed tile (m_prev = -inf), so that tile never skips.
  gap = jnp.max(jnp.where(takes_part, tile_max - m_prev, -jnp.inf))  # scalar Δ
  any_row = gap > -jnp.inf
  skip = any_row & (gap < lam) & jnp.logical_not(tainted)

  @pl.when(skip)
  def count_skip():
    skipped_ref[0] += jnp.int32(1)

  @pl.when((any_row | tainted) & jnp.logical_not(skip))
  def accumulate():
    m_new = jnp.maximum(m_prev, tile_max)
    # A row with no unmasked element yet keeps m = -inf; shift by 0 there so exp never sees -inf - -inf.
    shift = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    alpha = jnp.exp(m_prev - shift)  # [block_q, 1]
    p = jnp.exp(logits - shift)  # [block_q, block_k]; masked logits give exactly 0
    l_new = alpha * l_ref[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32, precision=_matmul_precision(v.dtype))
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l_new, l_ref.shape)


def _to_head_major(x: jax.Array, padded_len: int) -> jax.Array:
  """[batch, seq, heads, head_dim] -> zero-padded [batch, heads, padded_len, head_dim].

  Head-major puts (seq, head_dim) in the two minor dims, where TPU tiles need them; the zero padding
  keeps the last partial block finite (masked columns then contribute exactly 0 · 0).
  """
  x = jnp.pad(x, ((0, 0), (0, padded_len - x.shape[1]), (0, 0), (0, 0)))
  return jnp.transpose(x, (0, 2, 1, 3))


def _call_kernel(q_hm, k_hm, v_hm, kv_indices, kv_counts, tainted, lam, *, q_len: int, kv_len: int,
                 causal: bool, block_q: int, block_k: int, sm_scale: float, grid_width: int, interpret):
  """One pallas_call over head-major, padded operands.

  Args:
    q_hm: [batch, heads, T_pad, head_dim]; k_hm, v_hm: [batch, kv_heads, S_pad, head_dim].
    kv_indices: int32 [batch, heads, n_q_blocks, grid_width]; kv_counts: int32 [batch, heads, n_q_blocks].
    tainted: int32 [batch, heads, n_q_blocks] (`kernels.block_index.nonfinite_kept_blocks`).
    lam: f32 [heads].

  Returns:
    out_hm: [batch, heads, T_pad, head_dim]; pv_skipped: int32 [batch, heads, n_q_blocks].
  """
  batch, heads, padded_q_len, head_dim = q_hm.shape
  group = heads // k_hm.shape[1]
  n_q_blocks = padded_q_len // block_q
  # 1-D SMEM arrays avoid the tile padding that multi-dimensional SMEM arrays get.
  kv_indices = kv_indices.reshape(-1)
  kv_counts = kv_counts.reshape(-1)
  tainted = tainted.reshape(-1)

  def row_of(b, h, i):
    return (b * heads + h) * n_q_blocks + i

  def q_index_map(b, h, i, j, indices_ref, counts_ref, lam_ref, tainted_ref):
    del j, indices_ref, counts_ref, lam_ref, tainted_ref
    return b, h, i, 0

  def kv_index_map(b, h, i, j, indices_ref, counts_ref, lam_ref, tainted_ref):
    del counts_ref, lam_ref, tainted_ref
    # GQA: query head h reads kv head h // group; K/V are never repeated in memory. lax.div (truncating)
    # equals // for h >= 0 and avoids the sign fix-up that Python floor division lowers to.
    kv_head = h if group == 1 else lax.div(h, jnp.int32(group))
    return b, kv_head, indices_ref[row_of(b, h, i) * grid_width + j], 0

  def pv_skipped_index_map(b, h, i, j, indices_ref, counts_ref, lam_ref, tainted_ref):
    del j, indices_ref, counts_ref, lam_ref, tainted_ref
    return b, h, i, 0, 0

  kernel = functools.partial(
      _block_sparse_kernel, causal=causal, block_q=block_q, block_k=block_k, sm_scale=sm_scale,
      q_len=q_len, kv_len=kv_len, heads=heads, n_q_blocks=n_q_blocks, grid_width=grid_width)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(batch, heads, n_q_blocks, grid_width),
      in_specs=[
          pl.BlockSpec((None, None, block_q, head_dim), q_index_map),
          pl.BlockSpec((None, None, block_k, head_dim), kv_index_map),
          pl.BlockSpec((None, None, block_k, head_dim), kv_index_map),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_q, head_dim), q_index_map),
          pl.BlockSpec((None, None, None, 1, NUM_LANES), pv_skipped_index_map),
      ],
      # m and l are stored lane-replicated, [block_q, NUM_LANES], so that they fill whole vregs and
      # never need a relayout (splash attention keeps its row statistics the same way).
      scratch_shapes=[
          pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
          pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
          pltpu.VMEM((block_q, head_dim), jnp.float32),
          pltpu.SMEM((1,), jnp.int32),
          pltpu.SMEM((1,), jnp.int32),
      ],
  )
  name = f"block_sparse_mosaic_bq{block_q}_bk{block_k}{'_causal' if causal else ''}"
  out_hm, pv_skipped = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[
          jax.ShapeDtypeStruct(q_hm.shape, q_hm.dtype),
          jax.ShapeDtypeStruct((batch, heads, n_q_blocks, 1, NUM_LANES), jnp.int32),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=name,
      metadata={"block_sizes": json.dumps({"block_q": block_q, "block_k": block_k})},
  )(kv_indices, kv_counts, lam, tainted, q_hm, k_hm, v_hm)
  return out_hm, pv_skipped[..., 0, 0]


def _batch_chunk(batch: int, heads: int, n_q_blocks: int, grid_width: int, smem_budget_bytes: int, *,
                 compiling_for_tpu: bool, flag_words: int = 0) -> int:
  """Batch elements per pallas_call so that the scalar-prefetched index lists fit the SMEM budget.

  flag_words: further int32 words per batch element (the tainted-row flags).
  """
  # int32 kv_indices + kv_counts, and the flags.
  bytes_per_element = 4 * heads * n_q_blocks * (grid_width + 1) + 4 * flag_words
  if compiling_for_tpu and bytes_per_element > 2 * smem_budget_bytes:
    raise ValueError(
        f"The kept-block lists of one batch element (heads={heads} x n_q_blocks={n_q_blocks} x "
        f"{grid_width + 1} int32, plus {flag_words} flags = {bytes_per_element} bytes) do not fit in SMEM "
        f"({2 * smem_budget_bytes} bytes); use larger block_q/block_k.")
  return max(1, min(batch, smem_budget_bytes // bytes_per_element))


@functools.partial(
    jax.jit,
    static_argnames=("causal", "block_q", "block_k", "sm_scale", "grid_width", "batch_chunk", "interpret"))
def _block_sparse_forward(q, k, v, kv_indices, kv_counts, lam, *, causal: bool, block_q: int,
                          block_k: int, sm_scale: float, grid_width: int, batch_chunk: int, interpret):
  q_len, kv_len = q.shape[1], k.shape[1]
  n_q_blocks, n_k_blocks = pl.cdiv(q_len, block_q), pl.cdiv(kv_len, block_k)
  # One extra HBM pass each: with the heads axis between seq and head_dim, a per-head block would leave a
  # squeezed second-minor dim, which TPU tiling does not allow.
  q_hm = _to_head_major(q, n_q_blocks * block_q)  # [batch, heads, T_pad, head_dim]
  k_hm = _to_head_major(k, n_k_blocks * block_k)  # [batch, kv_heads, S_pad, head_dim]
  v_hm = _to_head_major(v, n_k_blocks * block_k)
  tainted = nonfinite_kept_blocks(k, v, kv_indices, kv_counts, block_k)
  kv_indices = kv_indices[..., :grid_width].astype(jnp.int32)
  kv_counts = kv_counts.astype(jnp.int32)
  call = functools.partial(
      _call_kernel, lam=lam.astype(jnp.float32), q_len=q_len, kv_len=kv_len, causal=causal,
      block_q=block_q, block_k=block_k, sm_scale=sm_scale, grid_width=grid_width, interpret=interpret)
  # Batch chunks run as separate kernel calls, each with index lists small enough for SMEM.
  operands = (q_hm, k_hm, v_hm, kv_indices, kv_counts, tainted)
  chunks = [call(*(x[start:start + batch_chunk] for x in operands))
            for start in range(0, q.shape[0], batch_chunk)]
  out_hm = jnp.concatenate([out for out, _ in chunks], axis=0)
  pv_skipped = jnp.concatenate([skipped for _, skipped in chunks], axis=0)
  return jnp.transpose(out_hm[:, :, :q_len], (0, 2, 1, 3)), pv_skipped


def block_sparse_attention_mosaic(q: jax.Array, k: jax.Array, v: jax.Array, kv_indices: jax.Array,
                                  kv_counts: jax.Array, lam: jax.Array, *, causal: bool, block_q: int,
                                  block_k: int, sm_scale: float,
                                  interpret: bool | pltpu.InterpretParams = False
                                  ) -> tuple[jax.Array, jax.Array]:
  """Block-sparse attention over the kept key blocks, skipping P·V of tiles far below the row max.

  Semantics are those of `kernels.sparge_reference`: for each (batch, head, q block) the kept key blocks
  are visited in ascending order with an f32 online softmax; a tile whose largest logit gap
  Δ = max_r (tile_max_r - m_r) over taking-part rows is below λ adds nothing (and counts as skipped).

  Block sizes: any positive sizes run in interpret mode (tests use 8/16/32). On a real TPU, block_q must
  be a multiple of 8 (sublanes; 16 packs bf16 rows fully) and block_k a multiple of 128 (lanes of the
  [block_q, block_k] logits tile); good defaults are block_q = 128..512 and block_k = 128..512.
  head_dim is taken whole (a multiple of 128, or 64, keeps the tiles dense).

  SMEM: kv_indices (cut to the grid width), kv_counts and lam are scalar-prefetched as int32/f32. When
  they would take more than half a core's SMEM, the batch is split over several kernel calls; a single
  batch element must fit on its own (heads x n_q_blocks x n_k_blocks words; raise block sizes if not).

  Args:
    q: [batch, T, heads, head_dim].
    k, v: [batch, S, kv_heads, head_dim]; heads % kv_heads == 0 (GQA through the kv index map).
    kv_indices: int32 [batch, heads, n_q_blocks, n_k_blocks] from
      `kernels.block_index.mask_to_kv_indices`: row (b, h, i) visits kv_indices[b, h, i, :count] and
      later entries repeat the last kept index.
    kv_counts: int32 [batch, heads, n_q_blocks], kept blocks per row. When concrete (not traced), the
      grid's last axis shrinks to the fullest row's count.
    lam: f32 [heads], natural-log units, <= 0; -inf never skips.
    causal: bottom-right aligned causal masking of elements (u <= t + S - T).
    block_q, block_k: tile sizes; n_q_blocks = ceil(T / block_q), n_k_blocks = ceil(S / block_k).
    sm_scale: logit scale, usually 1 / sqrt(head_dim).
    interpret: False compiles with Mosaic on a TPU and interprets elsewhere; True interprets everywhere
      (generic Pallas interpreter); `tpu_interpret_params()` runs Pallas' TPU simulator instead.

  Returns:
    out: [batch, T, heads, head_dim] in q.dtype; rows with nothing to attend to are 0.
    pv_skipped: int32 [batch, heads, n_q_blocks], visited blocks whose P·V was skipped.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  lam = jnp.asarray(lam, jnp.float32)
  interpret = _interpret_mode(interpret)
  compiling_for_tpu = interpret is False
  _check_block_sizes(block_q, block_k, compiling_for_tpu=compiling_for_tpu)
  _check_shapes(q, k, v, kv_indices, kv_counts, lam, block_q, block_k)
  if not math.isfinite(sm_scale):
    raise ValueError(f"sm_scale must be finite, got {sm_scale}.")
  batch, heads, n_q_blocks = kv_counts.shape
  grid_width = _grid_width(kv_counts, kv_indices.shape[-1])
  batch_chunk = _batch_chunk(batch, heads, n_q_blocks, grid_width, _smem_budget_bytes(compiling_for_tpu),
                             compiling_for_tpu=compiling_for_tpu, flag_words=heads * n_q_blocks)
  return _block_sparse_forward(
      q, k, v, jnp.asarray(kv_indices), jnp.asarray(kv_counts), lam, causal=bool(causal),
      block_q=int(block_q), block_k=int(block_k), sm_scale=float(sm_scale), grid_width=grid_width,
      batch_chunk=batch_chunk, interpret=interpret)
