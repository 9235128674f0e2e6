"""Block-sparse flash attention for Hopper (sm90+) as a Pallas Mosaic GPU kernel: TMA, wgmma, warp specialisation.

One CTA owns 128 query rows and three warpgroups. Two compute warpgroups take 64 rows each (wgmma's M);
the third is the producer: it reads the CTA's kept key-block list from GMEM and issues one TMA load of K
and one of V per entry into a two- (block_k = 128) or three-stage (block_k = 64) SMEM ring, waiting on
"consumed" barriers before it reuses a slot. The consumers run QKᵀ and PV on wgmma (bf16/f16 in, f32
accumulators in registers) with an f32 online softmax in base 2 (log2(e) folded into the logit scale),
and ping-pong on a schedule barrier so one warpgroup's softmax overlaps the other's matmuls
(FlashAttention-3). GQA reads kv head h // (heads // kv_heads) in the TMA slice, so K and V are never
repeated.

Kept lists per CTA. A mask row is a q block of block_q rows; with block_q = 128 both warpgroups belong to
the same row, with block_q = 64 each warpgroup has its own row. The CTA walks the *union* of its
warpgroups' ascending lists (`_cta_lists`): every entry is `4 · key block + membership`, bit w set when
warpgroup w keeps the block. A warpgroup that does not keep an entry still waits on and releases its
barriers (their phases are tracked per thread) but skips the matmuls. With every causal-valid block kept,
the two rows of a 64 × 128 CTA keep the same key blocks, so nothing is loaded for nothing. Blocks that are
fully visible to all of a warpgroup's rows form a prefix of the list (its length is precomputed per
warpgroup); only the suffix after it (the causal diagonal and the ragged last key block) applies an element
mask. Ragged lengths are padded to whole tiles here (zeros; masked columns, cropped rows), and a row with
nothing unmasked in its kept tiles outputs exactly 0, as in `kernels.block_sparse_reference`.

What runs elsewhere, and why:
  * λ > −∞ for some head (the P·V skip): the decision is a max over all rows of a q block, which here spans
    four warps (block_q = 64) or two warpgroups (block_q = 128); the skip branch would cost a cross-warp
    reduction and, for 128-row blocks, a cross-warpgroup exchange every tile. Until that is measured to pay,
    such calls run `kernels.block_sparse_triton` (chosen at run time by `lax.cond`, as the Triton kernel
    picks its own λ-free variant). With every λ = −∞ this kernel runs; that is the dense-mode path the
    target (≤ 1.05× cuDNN) is about.
  * `return_residuals=True` (the forward of `jax.grad`): the Triton forward, whose residuals the Triton
    backward kernel reads (`Backend.backward` of "mosaic_gpu" is the Triton backward).
Non-finite inputs propagate through the arithmetic as in dense attention (no skip is ever taken here).

Interpret mode: `interpret=True` runs the kernel on CPU in Mosaic GPU's interpreter (`InterpretGPUParams`,
jax >= 0.10: simulated SMEM, TMA, barriers and three warpgroups). It has no register layouts, no
`run_state` and no transposed wgmma operand, so there QKᵀ and P·V are `lax.dot_general` on the same SMEM
tiles; everything else (lists, TMA slices, barrier protocol, masking, softmax) is the code that compiles.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from kernels.block_index import mask_to_kv_indices
from kernels.block_sparse_triton import _check_inputs as _triton_check_inputs
from kernels.block_sparse_triton import _pad_axis

_LOG2_E = math.log2(math.e)
ROWS_PER_WARPGROUP = 64        # wgmma's M: one compute warpgroup's query rows
COMPUTE_WARPGROUPS = 2
ROWS_PER_CTA = ROWS_PER_WARPGROUP * COMPUTE_WARPGROUPS
BLOCK_Q_CHOICES = (64, 128)
BLOCK_K_CHOICES = (64, 128)
HEAD_DIM_CHOICES = (64, 128)
DTYPES = ("bfloat16", "float16")
MIN_COMPUTE_CAPABILITY = (9, 0)
# The plgpu names this kernel uses; all exist in jax 0.10.2 and 0.11 (checked against both sources).
_PLGPU_API = ("kernel", "SMEM", "Barrier", "ACC", "TilingTransform", "SwizzleTransform", "CompilerParams",
              "Layout", "copy_gmem_to_smem", "copy_smem_to_gmem", "wait_smem_to_gmem", "commit_smem",
              "barrier_arrive", "barrier_wait", "wgmma", "transpose_ref", "layout_cast", "broadcasted_iota",
              "set_max_registers")


def _plgpu():
  """The Pallas Mosaic GPU module, or None when this jax has none (or lacks a name used here)."""
  try:
    import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return plgpu if all(hasattr(plgpu, name) for name in _PLGPU_API) else None


def _compute_capability(device) -> tuple[int, int] | None:
  capability = getattr(device, "compute_capability", None)
  if not capability:
    return None
  try:
    major, minor = str(capability).split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def _ptxas_causal_bug() -> bool:
  """CUDA 12.8.0 <= runtime < 12.9.1 miscompiles causal Mosaic GPU attention (jax's own FA3 refuses it)."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    version = cuda_versions.cuda_runtime_get_version() if cuda_versions is not None else None
  except Exception:  # pylint: disable=broad-except
    return False
  return version is not None and 12080 <= version < 12091


def platform_reason(*, causal: bool = False) -> str | None:
  """Why this process cannot run the kernel natively (None: it can): jax API, GPU, sm90+, CUDA."""
  if _plgpu() is None:
    return f"jax {jax.__version__} has no usable Pallas Mosaic GPU API (jax.experimental.pallas.mosaic_gpu)"
  if jax.default_backend() != "gpu":
    return f"the default platform is {jax.default_backend()!r}, not a GPU"
  device = jax.devices()[0]
  capability = _compute_capability(device)
  if capability is None or capability < MIN_COMPUTE_CAPABILITY:
    return (f"{device.device_kind} has compute capability {capability}; wgmma needs sm90 (Hopper) or newer")
  if causal and _ptxas_causal_bug():
    return "CUDA runtime 12.8.0 to 12.9.0 miscompiles causal Mosaic GPU attention (ptxas); use >= 12.9.1"
  return None


def shape_reason(*, block_q: int, block_k: int, head_dim: int | None = None,
                 dtype=None) -> str | None:
  """Why the kernel cannot take this layout (None: it can), naming what is allowed."""
  if block_q not in BLOCK_Q_CHOICES or block_k not in BLOCK_K_CHOICES:
    return (f"block_q must be one of {BLOCK_Q_CHOICES} and block_k one of {BLOCK_K_CHOICES}; got "
            f"block_q={block_q}, block_k={block_k}")
  if head_dim is not None and head_dim not in HEAD_DIM_CHOICES:
    return f"head_dim must be one of {HEAD_DIM_CHOICES}; got {head_dim}"
  if dtype is not None and jnp.dtype(dtype).name not in DTYPES:
    return f"q, k, v must be {' or '.join(DTYPES)}; got {jnp.dtype(dtype).name}"
  return None


def unsupported_reason(config, platform: str, head_dim: int | None = None, dtype=None) -> str | None:
  """`Backend.supports` hook of the registry: why "mosaic_gpu" cannot run `config` here, or None."""
  if platform != "gpu":
    return f"it needs a GPU; the default platform is {platform!r}"
  return (shape_reason(block_q=config.block_q, block_k=config.block_k, head_dim=head_dim, dtype=dtype)
          or platform_reason(causal=config.causal))


def supported(*, block_q: int = 128, block_k: int = 128, head_dim: int | None = None, dtype=None,
              causal: bool = False) -> bool:
  """Whether the kernel can run natively here for this layout (sm90+, the API present, shapes allowed)."""
  return (shape_reason(block_q=block_q, block_k=block_k, head_dim=head_dim, dtype=dtype) is None
          and platform_reason(causal=causal) is None)


def interpret_params():
  """`interpret=` value for Mosaic GPU's CPU interpreter (jax >= 0.10), or None when absent."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return InterpretGPUParams()


# ----------------------------------------------------------------------------------------------------
# Host side: the per-CTA union lists.


def _kept_from_lists(kv_indices: jax.Array, kv_counts: jax.Array) -> jax.Array:
  """bool [batch, heads, n_q_blocks, n_k_blocks] back from the compact lists (one scatter)."""
  batch, heads, n_q, n_k = kv_indices.shape
  listed = jnp.arange(n_k, dtype=jnp.int32) < kv_counts[..., None]
  columns = jnp.where(listed, kv_indices, n_k)      # unlisted positions land in a dropped column
  b, h, i = np.ogrid[:batch, :heads, :n_q]
  kept = jnp.zeros((batch, heads, n_q, n_k + 1), jnp.bool_)
  kept = kept.at[b[..., None], h[..., None], i[..., None], columns].set(True)
  return kept[..., :n_k]


def _full_blocks(first_row: np.ndarray, *, causal: bool, block_k: int, q_len: int,
                 kv_len: int) -> np.ndarray:
  """Leading key blocks fully visible to every row from `first_row` on (ragged and causal edges)."""
  full = kv_len // block_k
  if not causal:
    return np.full(first_row.shape, full, np.int32)
  visible = np.maximum(first_row + (kv_len - q_len + 1), 0)
  return np.minimum(visible // block_k, full).astype(np.int32)


def _cta_lists(kv_indices: jax.Array, kv_counts: jax.Array, *, block_q: int, block_k: int, causal: bool,
               q_len: int, kv_len: int, n_cta: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The union list each CTA walks.

  Returns:
    entries: int32 [batch, heads, n_cta, n_k_blocks], ascending `4 · block + membership` (bit w: compute
      warpgroup w keeps the block); entries past `counts` repeat the last one.
    counts: int32 [batch, heads, n_cta].
    plain: int32 [batch, heads, n_cta, 2], per warpgroup the length of the list prefix that needs no
      element mask.
  """
  batch, heads, n_q, _ = kv_indices.shape
  kept = _kept_from_lists(kv_indices, kv_counts)
  rows_per_q_block = block_q // ROWS_PER_WARPGROUP
  n_wg_rows = n_cta * COMPUTE_WARPGROUPS
  # Mask row of each warpgroup of each CTA; rows past the last q block (padding) keep nothing.
  wg_row = np.arange(n_wg_rows) // rows_per_q_block
  kept = jnp.pad(kept, ((0, 0), (0, 0), (0, max(int(wg_row.max()) + 1 - n_q, 0)), (0, 0)))[:, :, wg_row]
  kept = kept.reshape(batch, heads, n_cta, COMPUTE_WARPGROUPS, -1)
  membership = kept[:, :, :, 0].astype(jnp.int32) + 2 * kept[:, :, :, 1].astype(jnp.int32)
  union_indices, counts = mask_to_kv_indices(membership > 0)
  entries = 4 * union_indices + jnp.take_along_axis(membership, union_indices, axis=-1)
  first_row = np.arange(n_wg_rows).reshape(n_cta, COMPUTE_WARPGROUPS) * ROWS_PER_WARPGROUP
  full = _full_blocks(first_row, causal=causal, block_k=block_k, q_len=q_len, kv_len=kv_len)
  listed = jnp.arange(entries.shape[-1]) < counts[..., None]
  plain = jnp.sum(listed[..., None] & (union_indices[..., None] < full[:, None, :]), axis=-2,
                  dtype=jnp.int32)
  return entries.astype(jnp.int32), counts.astype(jnp.int32), plain


# ----------------------------------------------------------------------------------------------------
# The kernel.


def _kernel(entries_ref, counts_ref, plain_ref, q_ref, k_ref, v_ref, out_ref, scoped, *, plgpu,
            causal: bool, block_k: int, q_len: int, kv_len: int, head_dim: int, group: int, stages: int,
            n_cta: int, logit_scale: float, native: bool):
  """One CTA: 128 query rows of one (batch, head); warpgroups 0, 1 compute, warpgroup 2 loads K/V.

  entries_ref, counts_ref, plain_ref: the `_cta_lists` arrays in GMEM, read as scalars.
  q_ref, out_ref: [batch, n_cta · 128, heads, head_dim]; k_ref, v_ref: [batch, n_k · block_k, kv_heads,
  head_dim] (padded); scoped: SMEM buffers and barriers allocated by `entry`. native: False in the
  CPU interpreter (no register layouts, no `run_state`).
  """
  (q_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_used, v_used), schedule = scoped
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  # Reversed so that, under causal masking, the longest rows start first (shorter tail).
  cta = n_cta - 1 - lax.axis_index("q_tiles")
  wg = lax.axis_index("wg")
  count = counts_ref[batch, head, cta]

  def schedule_round():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    q_smem = q_smem2.at[wg]
    first_row = cta * ROWS_PER_CTA + wg * ROWS_PER_WARPGROUP
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first_row, ROWS_PER_WARPGROUP), head], q_smem,
                            q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    # Register layouts are pinned for the compiler; the interpreter has no layouts (nor layout_cast).
    def tile_iota(shape, dimension):
      if not native:
        return lax.broadcasted_iota(jnp.int32, shape, dimension)
      return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)

    def in_layout(x, layout):
      return plgpu.layout_cast(x, layout) if native else x
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    acc = in_layout(jnp.zeros((ROWS_PER_WARPGROUP, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    row_max = in_layout(jnp.full((ROWS_PER_WARPGROUP,), -jnp.inf, jnp.float32), row_layout)
    row_sum = in_layout(jnp.zeros((ROWS_PER_WARPGROUP,), jnp.float32), row_layout)
    my_bit = jnp.where(wg == 0, 1, 2).astype(jnp.int32)
    n_plain = plain_ref[batch, head, cta, wg]

    def compute(slot, block, carry, *, masked: bool):
      acc, row_max, row_sum = carry

      def qk_product(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
        schedule_round()
        return acc_ref[...]
      if native:
        s = pl.run_scoped(qk_product, plgpu.ACC((ROWS_PER_WARPGROUP, block_k), jnp.float32))
      else:
        # The interpreter's wgmma cannot read a transposed ref: the same product from SMEM values.
        s = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
        schedule_round()
      plgpu.barrier_arrive(k_used.at[slot])
      s = s * logit_scale
      if masked:
        shape = (ROWS_PER_WARPGROUP, block_k)
        rows = first_row + tile_iota(shape, 0)
        cols = block * block_k + tile_iota(shape, 1)
        allowed = cols < kv_len
        if causal:
          allowed = allowed & (cols <= rows + (kv_len - q_len))
        s = jnp.where(allowed, s, -jnp.inf)
      new_max = jnp.maximum(row_max, s.max(axis=1))
      # A row with no finite logit yet keeps max -inf; shift it by 0 so exp2 gives 0, not NaN.
      shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      correction = jnp.exp2(row_max - shift)
      p = jnp.exp2(s - lax.broadcast_in_dim(shift, s.shape, [0]))
      row_sum = row_sum * correction + p.sum(axis=1)
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
      p = p.astype(q_smem.dtype)
      acc, row_sum, new_max, p = lax.optimization_barrier((acc, row_sum, new_max, p))
      plgpu.barrier_arrive(schedule)          # softmax done
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(schedule)            # the other warpgroup's matmuls are issued

      def pv_product(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem.at[slot])
      if native:
        acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
      else:
        acc = acc + lax.dot_general(p, v_smem[slot], (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      plgpu.barrier_arrive(v_used.at[slot])
      return acc, new_max, row_sum

    def pass_by(slot, carry):
      # The other warpgroup's block: keep the barrier phases and the ping-pong in step, compute nothing.
      plgpu.barrier_arrive(k_used.at[slot])
      schedule_round()
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_arrive(v_used.at[slot])
      schedule_round()
      return carry

    def visit(position, carry, *, masked: bool):
      slot = lax.rem(position, jnp.int32(stages))
      entry = entries_ref[batch, head, cta, position]
      block = lax.div(entry, jnp.int32(4))
      mine = lax.bitwise_and(entry, my_bit) != 0
      plgpu.barrier_wait(k_ready.at[slot])
      return lax.cond(mine, functools.partial(compute, slot, block, masked=masked),
                      functools.partial(pass_by, slot), carry)

    pl.when(wg == 1)(schedule_round)
    carry = (acc, row_max, row_sum)
    carry = lax.fori_loop(0, n_plain, functools.partial(visit, masked=False), carry)
    acc, row_max, row_sum = lax.fori_loop(n_plain, count, functools.partial(visit, masked=True), carry)
    pl.when(wg == 0)(schedule_round)

    # Only an exactly empty denominator gives 0; a NaN one (non-finite inputs) stays NaN.
    empty = row_sum == 0.0
    inverse = 1.0 / jnp.where(empty, 1.0, row_sum)
    out = acc * lax.broadcast_in_dim(inverse, acc.shape, [0])
    out = jnp.where(lax.broadcast_in_dim(empty, acc.shape, [0]), 0.0, out)
    q_smem[...] = out.astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_ref.at[batch, pl.ds(first_row, ROWS_PER_WARPGROUP), head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _produce():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, jnp.int32(group))

    def load(position, slot):
      block = lax.div(entries_ref[batch, head, cta, position], jnp.int32(4))
      tile = (batch, pl.ds(block * block_k, block_k), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[tile], k_smem.at[slot], k_ready.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[tile], v_smem.at[slot], v_ready.at[slot])

    for position in range(stages):
      pl.when(position < count)(functools.partial(load, position, position))

    def refill(position, _):
      slot = lax.rem(position, jnp.int32(stages))
      # Both K and V of this slot must be released before either is overwritten.
      plgpu.barrier_wait(k_used.at[slot])
      plgpu.barrier_wait(v_used.at[slot])
      load(position + stages, slot)
      return None
    lax.fori_loop(0, jnp.maximum(count - stages, 0), refill, None)

    def drain(position, _):
      # Observe the last releases too, so every barrier phase is waited on by every thread that waits.
      slot = lax.rem(position, jnp.int32(stages))
      plgpu.barrier_wait(k_used.at[slot])
      plgpu.barrier_wait(v_used.at[slot])
      return None
    lax.fori_loop(jnp.maximum(count - stages, 0), count, drain, None)


def _stages(block_k: int, head_dim: int) -> int:
  """K/V ring depth: as deep as ~200 KiB of SMEM allows beside the two Q tiles (2 or 3)."""
  tile_bytes = 2 * block_k * head_dim * 2                         # K and V, 2-byte dtypes
  q_bytes = ROWS_PER_CTA * head_dim * 2
  return max(2, min(3, (200 * 1024 - q_bytes) // tile_bytes))


def _mosaic_forward(q, k, v, kv_indices, kv_counts, *, causal: bool, block_q: int, block_k: int,
                    sm_scale: float, interpret) -> tuple[jax.Array, jax.Array]:
  """The λ-free Mosaic GPU forward -> (out, pv_skipped = 0)."""
  plgpu = _plgpu()
  batch, q_len, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  n_q_blocks, n_k_blocks = kv_indices.shape[2:]
  n_cta = -(-q_len // ROWS_PER_CTA)
  entries, counts, plain = _cta_lists(kv_indices, kv_counts, block_q=block_q, block_k=block_k,
                                      causal=causal, q_len=q_len, kv_len=kv_len, n_cta=n_cta)
  q = _pad_axis(q, 1, n_cta * ROWS_PER_CTA)
  k = _pad_axis(k, 1, n_k_blocks * block_k)
  v = _pad_axis(v, 1, n_k_blocks * block_k)
  stages = _stages(block_k, head_dim)
  dtype = q.dtype

  def entry(entries_ref, counts_ref, plain_ref, q_ref, k_ref, v_ref, out_ref):
    # 128-byte swizzle over (8, 64) tiles: the layout wgmma reads and TMA writes (head_dim % 64 == 0).
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    buffers = (
        plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=transforms),
    )
    body = functools.partial(
        _kernel, entries_ref, counts_ref, plain_ref, q_ref, k_ref, v_ref, out_ref, plgpu=plgpu,
        causal=causal, block_k=block_k, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        group=heads // kv_heads, stages=stages, n_cta=n_cta, logit_scale=sm_scale * _LOG2_E,
        native=interpret is None)
    pl.run_scoped(
        lambda *scoped: body(scoped),
        buffers,
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
        collective_axes="wg",
    )

  kwargs = {} if interpret is None else {"interpret": interpret}
  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      grid=(heads, n_cta, batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kwargs,
  )(entries, counts, plain, q, k, v)
  return out[:, :q_len], jnp.zeros((batch, heads, n_q_blocks), jnp.int32)


def _check_inputs(q, k, v, kv_indices, kv_counts, lam, block_q: int, block_k: int) -> None:
  """The Triton kernel's checks (shapes, block sizes, lists, λ), then what only this kernel requires."""
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
  reason = shape_reason(block_q=block_q, block_k=block_k, head_dim=q.shape[-1], dtype=q.dtype)
  if reason:
    raise ValueError(f"backend='mosaic_gpu' cannot run this call: {reason}. Use backend='triton' "
                     "(any power-of-two blocks >= 16, any head_dim, f32) or 'auto'.")
  _triton_check_inputs(q, k, v, kv_indices, kv_counts, lam, block_q, block_k)


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k", "sm_scale", "interpret",
                                             "return_residuals"))
def block_sparse_attention_mosaic_gpu(q: jax.Array, k: jax.Array, v: jax.Array, kv_indices: jax.Array,
                                      kv_counts: jax.Array, lam: jax.Array, *, causal: bool, block_q: int,
                                      block_k: int, sm_scale: float, interpret: bool = False,
                                      return_residuals: bool = False) -> tuple[jax.Array, ...]:
  """Block-sparse attention over kept key-block lists on Hopper; the front door's "mosaic_gpu" backend.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim] (any T, S; padded here);
      bfloat16 or float16, head_dim 64 or 128.
    kv_indices, kv_counts: `kernels.block_index.mask_to_kv_indices` of a mask already ANDed with causal
      validity (int32 [batch, heads, n_q_blocks, n_k_blocks] and [batch, heads, n_q_blocks]).
    lam: f32 [heads], natural-log units, <= 0; any λ > -inf runs the Triton kernel (module docstring).
    causal: bottom-right aligned causal masking (u <= t + S - T).
    block_q: 64 or 128; block_k: 64 or 128 (the block shapes the mask was built with).
    sm_scale: logit scale.
    interpret: run in Mosaic GPU's CPU interpreter (and the Triton fallback in Pallas interpret mode).
    return_residuals: return the Triton forward's (out, pv_skipped, lse, tile_skipped) for the Triton
      backward (`kernels.block_sparse_triton` documents them).

  Returns:
    out [batch, T, heads, head_dim] in q.dtype (rows with nothing kept are 0) and pv_skipped int32
    [batch, heads, n_q_blocks], as every backend.
  """
  _check_inputs(q, k, v, kv_indices, kv_counts, lam, block_q, block_k)
  from kernels.block_sparse_triton import block_sparse_attention_triton  # pylint: disable=g-import-not-at-top
  statics = dict(causal=causal, block_q=block_q, block_k=block_k, sm_scale=sm_scale)
  if return_residuals:
    return block_sparse_attention_triton(q, k, v, kv_indices, kv_counts, lam, interpret=interpret,
                                         return_residuals=True, **statics)
  if interpret:
    mode = interpret_params()
    if mode is None:
      raise ValueError(f"jax {jax.__version__} has no Mosaic GPU interpret mode (InterpretGPUParams).")
  else:
    reason = platform_reason(causal=causal)
    if reason:
      raise ValueError(f"backend='mosaic_gpu' cannot run here: {reason}. Use backend='auto' or 'triton'.")
    mode = None

  def with_skip(q, k, v, kv_indices, kv_counts, lam):
    return block_sparse_attention_triton(q, k, v, kv_indices, kv_counts, lam, interpret=interpret,
                                         **statics)

  def without_skip(q, k, v, kv_indices, kv_counts, lam):
    del lam
    return _mosaic_forward(q, k, v, kv_indices, kv_counts, interpret=mode, **statics)

  return lax.cond(jnp.any(lam > -jnp.inf), with_skip, without_skip, q, k, v, kv_indices, kv_counts, lam)
