"""Times our block-sparse attention kernels against cuDNN, Pallas mha and FlexAttention on one GPU.

For causal bf16 attention (batch 1, 32 heads, head_dim 128) at each sequence length it times dense cuDNN,
Pallas `mha` (its best block sizes), and each of our kernels (Triton, and the Hopper Mosaic GPU kernel at
the blocks of `--mosaic_blocks`) with every block kept, at block densities ≈ 0.5 / 0.3 / 0.15 on masks
predicted by `predict_block_mask` from structured q/k (planted locality and heavy columns, τ bisected per
head to hit the density) and on random masks with the diagonal kept, plus mask prediction and mask
compaction (both `mask_to_kv_indices` methods) alone, and torch FlexAttention on the very same block
lists, all in one run. Ratios: `vs cuDNN` (ours / cuDNN dense: the dense-mode target), `vs d·cuDNN`
(ours / (density × cuDNN)) and `vs Flex`. FlexAttention is compiled (`fullgraph=True`, dynamo errors not
suppressed) with kernel options matching the block size, retried under max-autotune when the default
heuristics offer no valid tile; a compile that still fails is recorded as NaN with its reason, never timed
eagerly. It also checks the Triton kernel against the jnp reference on the GPU. Modes: `full` (the table), `check` (correctness only), `sweep` (Triton
launch parameters). `--backward` adds the backward pass: the time of dq, dk, dv alone (the VJP applied to
saved residuals) for cuDNN, our kernels and FlexAttention on the same block lists, and in the check a
comparison of our gradients with the VJP of the f32 jnp reference. Run from the repository root:

  python -m benchmarks.kernel_bench --mode=full --seq_lens=8192,32768
  python -m benchmarks.kernel_bench --mode=full --seq_lens=65536 --append --nocheck --reps=5
  python -m benchmarks.kernel_bench --mode=full --backward --seq_lens=4096,16384

`full` writes results/kernel_bench.json and results/kernel_bench.md (the table, generated from the JSON);
`--markdown_only` regenerates the table from an existing JSON.
"""

from __future__ import annotations

import os

# JAX and torch share the GPU in one process: JAX must not grab most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# pylint: disable=g-import-not-at-top,wrong-import-position
import functools
import itertools
import json
import math
import platform
import statistics
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cli
from kernels import block_sparse_mosaic_gpu
from kernels import block_sparse_triton
from kernels.block_config import BlockSparseConfig
from kernels.block_index import causal_block_mask, mask_to_kv_indices
from kernels.block_sparse import run_block_sparse
from kernels.block_sparse_reference import block_sparse_attention_reference
from kernels.sparge import predict_block_mask
from kernels.sparge import SpargeParams
# pylint: enable=g-import-not-at-top,wrong-import-position

# Its own FlagValues: other benchmarks and the CLI define the same names (`benchmarks.cli`).
FLAGS = cli.module_flags()
_MODE = flags.DEFINE_enum("mode", "full", ["full", "check", "sweep"], "What to run.", flag_values=FLAGS)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "32768", "65536"], "T = S values.", flag_values=FLAGS)
_BLOCKS = flags.DEFINE_list("blocks", ["64x64", "64x128", "128x128"], "block_q x block_k configs.",
    flag_values=FLAGS)
_MOSAIC_BLOCKS = flags.DEFINE_list(
    "mosaic_blocks", ["64x128", "128x128"],
    "Blocks of --blocks at which the Mosaic GPU kernel is timed too (the shapes its H200 check covered).",
    flag_values=FLAGS)
_DENSITIES = flags.DEFINE_list("densities", ["0.5", "0.3", "0.15"], "Target block densities.",
    flag_values=FLAGS)
_HEADS = flags.DEFINE_integer("heads", 32, "Query (= kv) heads.", flag_values=FLAGS)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.", flag_values=FLAGS)
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions (median reported).", flag_values=FLAGS)
_FLEX = flags.DEFINE_bool("flex", True, "Also time torch FlexAttention on the same block lists.",
    flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "results/kernel_bench.json", "Where the JSON goes (.md beside it).",
    flag_values=FLAGS)
_MARKDOWN_ONLY = flags.DEFINE_bool("markdown_only", False, "Only regenerate the .md from --out.",
    flag_values=FLAGS)
_APPEND = flags.DEFINE_bool("append", False, "Add these sequence lengths to the rows already in --out.",
    flag_values=FLAGS)
_CHECK = flags.DEFINE_bool("check", True, "Check the kernel against the reference before timing.",
    flag_values=FLAGS)
_BACKWARD = flags.DEFINE_bool("backward", False, "Also time (and check) the backward pass: dq, dk, dv.",
    flag_values=FLAGS)

_DTYPE = jnp.bfloat16
_MHA_BLOCKS = ((64, 64), (128, 64), (128, 128))
_LAMBDA = -2.0  # the λ of the P·V-skip timing row


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

# Each timed repetition runs this many calls back to back, so host dispatch overlaps device work.
_CALLS_PER_REP = 5


def time_jax(fn: Callable[..., Any], *args, warmup: int = 2, reps: int | None = None,
             slow_ms: float = math.inf) -> float:
  """Median ms per call of `fn(*args)` after compilation and warm-up (wall clock, synchronised).

  `reps` repetitions (default `--reps`) of `_CALLS_PER_REP` back-to-back calls each, or of one call when a
  warm-up call took longer than `slow_ms` (slow contenders would otherwise take minutes).
  """
  jax.block_until_ready(fn(*args))  # compilation
  start = time.perf_counter()
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  calls = 1 if 1e3 * (time.perf_counter() - start) / max(warmup, 1) > slow_ms else _CALLS_PER_REP
  times = []
  for _ in range(_REPS.value if reps is None else reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return 1e3 * statistics.median(times)


def time_torch(fn: Callable[[], Any], warmup: int = 2) -> float:
  """Median ms per call of `fn()` measured with CUDA events."""
  import torch  # pylint: disable=g-import-not-at-top
  for _ in range(1 + warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(_REPS.value):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(_CALLS_PER_REP):
      fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / _CALLS_PER_REP)
  return statistics.median(times)


@jax.jit
def _apply_vjp(vjp_fn, d_out):
  return vjp_fn(d_out)


def time_backward(fn: Callable[..., jax.Array], q, k, v, *rest) -> float:
  """Median ms of the backward pass alone: the VJP of `fn(q, k, v, *rest)` in q, k, v on saved residuals."""
  out, vjp_fn = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
  d_out = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
  return time_jax(_apply_vjp, vjp_fn, d_out)


def warm_up_gpu(seconds: float = 3.0) -> None:
  """Runs large matmuls so clocks are up before the first measurement."""
  x = jnp.ones((8192, 8192), _DTYPE)
  matmul = jax.jit(lambda x: x @ x)
  end = time.perf_counter() + seconds
  while time.perf_counter() < end:
    jax.block_until_ready(matmul(x))


# ---------------------------------------------------------------------------------------------------
# Inputs and masks
# ---------------------------------------------------------------------------------------------------

def random_qkv(seed: int, seq_len: int, heads: int, head_dim: int) -> tuple[jax.Array, ...]:
  """Gaussian q, k, v: [1, seq_len, heads, head_dim] bf16."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (1, seq_len, heads, head_dim), _DTYPE) for key in keys)


def structured_qkv(seed: int, seq_len: int, heads: int, head_dim: int) -> tuple[jax.Array, ...]:
  """q, k with planted locality (shared positional features) and heavy key columns, per-head strengths.

  Locality: q and k carry the same cos/sin features of the position, so q_t·k_u grows as |t - u| shrinks.
  Heavy columns: every query leans on one direction that a few scattered key blocks carry, and the
  first 64 keys strongly (an attention sink, as in LLMs), which is what lets λ skip later blocks.
  """
  q, k, v = random_qkv(seed, seq_len, heads, head_dim)
  rng = np.random.default_rng(seed)
  n_freq = 16
  positions = np.arange(seq_len)[:, None]
  freqs = 2 * np.pi / np.geomspace(256, 16384, n_freq)[None, :]
  features = np.concatenate([np.cos(positions * freqs), np.sin(positions * freqs)], axis=1)
  locality = rng.uniform(1.0, 2.5, heads)                              # per head
  pos_term = features[:, None, :] * locality[None, :, None]            # [T, heads, 2 * n_freq]
  heavy_keys = np.zeros(seq_len)
  for start in rng.choice(seq_len // 64, size=max(1, seq_len // 4096), replace=False) * 64:
    heavy_keys[start:start + 64] = 1.0
  heavy_keys[:64] = 1.0
  heavy_q = rng.uniform(1.0, 3.0, heads)
  planted_q = np.zeros((seq_len, heads, head_dim), np.float32)
  planted_k = np.zeros_like(planted_q)
  planted_q[..., :2 * n_freq] = pos_term
  planted_k[..., :2 * n_freq] = pos_term
  planted_q[..., 2 * n_freq] = heavy_q[None, :]
  planted_k[..., 2 * n_freq] = 6.0 * heavy_keys[:, None]
  planted_k[:64, :, 2 * n_freq] = 60.0
  q = (q.astype(jnp.float32) + planted_q[None]).astype(_DTYPE)
  k = (k.astype(jnp.float32) + planted_k[None]).astype(_DTYPE)
  return q, k, v


def block_geometry(seq_len: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
  """(causal-valid, fully-unmasked) bool [n_q, n_k] block maps for causal T = S."""
  valid = causal_block_mask(seq_len, seq_len, causal=True, block_q=block_q, block_k=block_k)
  n_q, n_k = valid.shape
  q_first = np.arange(n_q)[:, None] * block_q
  k_last = np.minimum(np.arange(n_k)[None, :] * block_k + block_k, seq_len) - 1
  return valid, k_last <= q_first


def random_mask(seed: int, density: float, heads: int, valid: np.ndarray, full: np.ndarray) -> np.ndarray:
  """bool [1, heads, n_q, n_k]: the partially-masked (diagonal) blocks plus random valid blocks."""
  diagonal = valid & ~full
  extra = (density * valid.sum() - diagonal.sum()) / max(full.sum(), 1)
  rng = np.random.default_rng(seed)
  kept = diagonal | (full & (rng.random((1, heads) + valid.shape) < max(extra, 0.0)))
  return kept


def cta_loads_per_kept(mask: np.ndarray, block_q: int) -> float:
  """K/V tiles the Mosaic GPU kernel loads per kept block: with block_q = 64 a CTA's two warpgroups own
  two mask rows and the CTA walks the union of their lists (`kernels.block_sparse_mosaic_gpu`), so rows
  that keep different blocks load more than they compute; 1.0 with block_q = 128 (one row per CTA).

  mask: bool [batch, heads, n_q_blocks, n_k_blocks].
  """
  if block_q != 64:
    return 1.0
  rows = np.asarray(mask, bool)
  if rows.shape[2] % 2:  # The last CTA's second warpgroup has no row.
    rows = np.concatenate([rows, np.zeros_like(rows[:, :, :1])], axis=2)
  pairs = rows.reshape(rows.shape[:2] + (rows.shape[2] // 2, 2, rows.shape[3]))
  return float((pairs[:, :, :, 0] | pairs[:, :, :, 1]).sum() / max(rows.sum() / 2, 1))


@functools.lru_cache(maxsize=None)
def predictor(block_q: int, block_k: int) -> Callable[..., jax.Array]:
  """Jitted causal `predict_block_mask(q, k, τ per head)` with the similarity filter off (θ = -1)."""
  return jax.jit(lambda q, k, tau: predict_block_mask(
      q, k, SpargeParams(tau=tau, theta=-1.0), causal=True, block_q=block_q, block_k=block_k))


def predicted_mask(q, k, density: float, block_q: int, block_k: int, valid: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Bisects τ per head until predict_block_mask keeps `density` of each head's causal-valid blocks."""
  predict = predictor(block_q, block_k)
  heads = q.shape[2]
  low, high = np.zeros(heads), np.ones(heads)
  for _ in range(16):
    tau = (low + high) / 2
    mask = np.asarray(predict(q, k, jnp.asarray(tau, jnp.float32)))
    head_density = mask.sum(axis=(0, 2, 3)) / valid.sum()
    low, high = np.where(head_density < density, tau, low), np.where(head_density < density, high, tau)
  tau = (low + high) / 2
  return np.asarray(predict(q, k, jnp.asarray(tau, jnp.float32))), tau


# ---------------------------------------------------------------------------------------------------
# The contenders
# ---------------------------------------------------------------------------------------------------

def ours(block_q: int, block_k: int, head_dim: int, **launch) -> Callable[..., Any]:
  sm_scale = 1.0 / math.sqrt(head_dim)
  return jax.jit(functools.partial(block_sparse_triton.block_sparse_attention_triton, causal=True,
                                   block_q=block_q, block_k=block_k, sm_scale=sm_scale, **launch))


def ours_differentiable(block_q: int, block_k: int, backend: str = "triton") -> Callable[..., jax.Array]:
  """The front door (mask -> out) on `backend`; differentiable (its custom_vjp), λ = -inf."""
  config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=True, backend=backend)
  return jax.jit(lambda q, k, v, mask: run_block_sparse(q, k, v, mask, config)[0])


def ours_mosaic_gpu(block_q: int, block_k: int, head_dim: int) -> Callable[..., Any]:
  """The Hopper kernel on the same (indices, counts, λ) arguments; λ = -inf runs the Mosaic GPU path."""
  return jax.jit(functools.partial(block_sparse_mosaic_gpu.block_sparse_attention_mosaic_gpu, causal=True,
                                   block_q=block_q, block_k=block_k, sm_scale=1.0 / math.sqrt(head_dim)))


def mosaic_gpu_reason(block: str, head_dim: int) -> str | None:
  """Why the Mosaic GPU kernel is not timed at `block` (None: it is)."""
  if block not in _MOSAIC_BLOCKS.value:
    return f"not in --mosaic_blocks={','.join(_MOSAIC_BLOCKS.value)}"
  block_q, block_k = map(int, block.split("x"))
  return (block_sparse_mosaic_gpu.shape_reason(block_q=block_q, block_k=block_k, head_dim=head_dim,
                                               dtype=_DTYPE)
          or block_sparse_mosaic_gpu.platform_reason(causal=True))


@functools.lru_cache(maxsize=None)
def compaction(method: str) -> Callable[..., Any]:
  return jax.jit(functools.partial(mask_to_kv_indices, method=method))


def cudnn_dense(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def pallas_mha_best(q, k, v) -> tuple[float, str]:
  """Pallas mha's fastest causal time over a few block sizes."""
  from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  best = (math.inf, "")
  for block_q, block_k in _MHA_BLOCKS:
    fn = jax.jit(functools.partial(attention.mha, segment_ids=None, causal=True,
                                   sm_scale=1.0 / math.sqrt(q.shape[-1]),
                                   block_sizes=attention.BlockSizes(block_q=block_q, block_k=block_k)))
    try:
      best = min(best, (time_jax(fn, q, k, v), f"{block_q}x{block_k}"))
    except Exception as error:  # pylint: disable=broad-except
      print(f"  mha {block_q}x{block_k} failed: {type(error).__name__}: {str(error)[:200]}")
  return best


# How FlexAttention is compiled, in the order tried: inductor's default heuristics (one tile config per
# head_dim and GPU, overridden by our kernel options), then max-autotune, whose candidate list holds
# backward tiles that divide 64-row blocks (torch 2.11's sm90 default backward tile (64, 128, 128, 64)
# does not, so the default backward has "No choices"). Neither ever runs eagerly: fullgraph=True and
# dynamo errors not suppressed make a failed compile raise, and the row records NaN with the reason.
_FLEX_MODES = ("default", "max-autotune-no-cudagraphs")
# A compiled Flex time this many times d·cuDNN is not a kernel: recorded as NaN (an eager fallback?).
_FLEX_IMPLAUSIBLE = 20.0


def _error_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


class Flex:
  """torch FlexAttention over the same kept-block lists (full blocks unmasked, diagonal blocks causal)."""

  def __init__(self, q, k, v):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.attention import flex_attention as flex  # pylint: disable=g-import-not-at-top
    self.torch, self.flex = torch, flex
    dynamo = torch._dynamo.config  # pylint: disable=protected-access
    dynamo.suppress_errors = False                     # a failed compile raises, never runs eagerly
    dynamo.recompile_limit = 64                        # (cache_size_limit before torch 2.6)
    if hasattr(dynamo, "fail_on_recompile_limit_hit"):
      dynamo.fail_on_recompile_limit_hit = True        # past the limit: raise, not an eager fallback
    # [B, T, H, D] -> [B, H, T, D]
    self.q, self.k, self.v = (torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    self._compiled: tuple[Any, Callable[..., Any]] | None = None   # ((blocks, mode), compiled fn)
    self._first_mode: dict[tuple[int, int], int] = {}                # blocks -> first _FLEX_MODES index

  @staticmethod
  def kernel_options(block_q: int, block_k: int) -> dict[str, int]:
    """Tiles that divide the sparse blocks: forward BLOCK_M x BLOCK_N, backward (M1, N1) for dk/dv and
    (M2, N2) for dq, with N1 % M1 == 0 and M2 % N2 == 0 as the backward template needs."""
    return {"fwd_BLOCK_M": min(block_q, 128), "fwd_BLOCK_N": 64,
            "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": block_k, "bwd_BLOCK_M2": block_q, "bwd_BLOCK_N2": 64}

  def _function(self, block_q: int, block_k: int, mode: str) -> Callable[..., Any]:
    key = ((block_q, block_k), mode)
    if self._compiled is None or self._compiled[0] != key:
      self.torch._dynamo.reset()  # pylint: disable=protected-access
      compiled = self.torch.compile(self.flex.flex_attention, fullgraph=True, dynamic=False,
                                    mode=None if mode == "default" else mode)
      self._compiled = (key, compiled)
    return self._compiled[1]

  def block_mask(self, mask: np.ndarray, full: np.ndarray, block_q: int, block_k: int):
    torch = self.torch
    def lists(kept):
      counts = kept.sum(-1).astype(np.int32)
      order = np.argsort(~kept, axis=-1, kind="stable").astype(np.int32)
      return torch.from_numpy(counts).cuda(), torch.from_numpy(order).cuda()
    partial_counts, partial_indices = lists(mask & ~full)
    full_counts, full_indices = lists(mask & full)
    seq_len = self.q.shape[2]
    return self.flex.BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=(block_q, block_k),
        mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, seq_lengths=(seq_len, seq_len))

  def _attempt(self, block_q: int, block_k: int, measure: Callable[[Callable[..., Any]], Any],
               budget_ms: float) -> tuple[Any, str]:
    """measure(fn) under each compile mode in turn -> (its result, how or why not); (None, reasons)."""
    errors = []
    first = self._first_mode.get((block_q, block_k), 0)
    for index, mode in enumerate(_FLEX_MODES[first:], start=first):
      try:
        result = measure(self._function(block_q, block_k, mode))
        ms = result[0] if isinstance(result, tuple) else result
        if ms > budget_ms:
          raise RuntimeError(f"{ms:.1f} ms > {_FLEX_IMPLAUSIBLE:g} x d·cuDNN: not a compiled kernel")
        self._first_mode[(block_q, block_k)] = index
        return result, mode
      except Exception as error:  # pylint: disable=broad-except
        errors.append(f"{mode}: {_error_line(error)}")
        print(f"  flex {block_q}x{block_k} {mode} failed: {errors[-1]}")
        self._compiled = None
    return None, "; ".join(errors)

  def run(self, block_mask, block_q: int, block_k: int, budget_ms: float = math.inf):
    """(ms, output as a jax array, compile mode or failure reasons); ms NaN and output None on failure."""
    options = self.kernel_options(block_q, block_k)

    def measure(fn):
      call = lambda: fn(self.q, self.k, self.v, block_mask=block_mask, kernel_options=options)
      out = call()
      return time_torch(call), out
    result, note = self._attempt(block_q, block_k, measure, budget_ms)
    if result is None:
      return math.nan, None, note
    ms, out = result
    return ms, jnp.asarray(out.permute(0, 2, 1, 3).float().cpu().numpy()), note

  def run_backward(self, block_mask, block_q: int, block_k: int, budget_ms: float = math.inf
                   ) -> tuple[float, str]:
    """(ms of the backward pass alone (autograd on a retained graph), compile mode or failure reasons)."""
    torch, options = self.torch, self.kernel_options(block_q, block_k)

    def measure(fn):
      q, k, v = (x.detach().requires_grad_() for x in (self.q, self.k, self.v))
      out = fn(q, k, v, block_mask=block_mask, kernel_options=options)
      d_out = torch.randn_like(out)
      return time_torch(lambda: torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True))
    ms, note = self._attempt(block_q, block_k, measure, budget_ms)
    return (math.nan if ms is None else ms), note


# ---------------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------------

def relative_error(out, ref) -> float:
  out, ref = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (out, ref))
  return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def check_against_reference() -> list[dict[str, Any]]:
  """bf16 kernel vs the f32 jnp reference on the GPU: structured and ragged GQA inputs, per-head λ."""
  rows = []
  cases = [  # (T, S, heads, kv_heads, head_dim, block_q, block_k)
      (2048, 2048, 32, 32, 128, 64, 64), (2048, 2048, 32, 32, 128, 64, 128),
      (2048, 2048, 32, 32, 128, 128, 128), (1000, 1100, 9, 3, 64, 64, 128), (777, 500, 8, 2, 72, 128, 64)]
  for case in cases:
    q_len, kv_len, heads, kv_heads, head_dim, block_q, block_k = case
    q, k, v = structured_qkv(1, max(q_len, kv_len), heads, head_dim)
    q, k, v = q[:, :q_len], k[:, :kv_len, :kv_heads], v[:, :kv_len, :kv_heads]
    # Random kept blocks (70% of the causal-valid ones) behind the sink: far blocks then skip.
    valid = causal_block_mask(q_len, kv_len, causal=True, block_q=block_q, block_k=block_k)
    rng = np.random.default_rng(q_len)
    mask = jnp.asarray((rng.random((1, heads) + valid.shape) < 0.7) & valid)
    mask = mask.at[0, 0, 1].set(False)  # an empty row
    lam = jnp.linspace(-8.0, -0.5, heads).at[0].set(-jnp.inf)
    indices, counts = mask_to_kv_indices(mask)
    out, skipped = ours(block_q, block_k, head_dim)(q, k, v, indices, counts, lam)
    ref, ref_skipped = block_sparse_attention_reference(q, k, v, mask, lam, causal=True, block_q=block_q,
                                                        block_k=block_k,
                                                        sm_scale=1.0 / math.sqrt(head_dim))
    row = dict(case=case, rel_error=relative_error(out, ref), finite=bool(jnp.isfinite(out).all()),
               skipped=int(skipped.sum()), ref_skipped=int(ref_skipped.sum()),
               skip_count_mismatches=int((skipped != ref_skipped).sum()), visited=int(counts.sum()))
    if _BACKWARD.value:
      row["grad_rel_error"] = check_gradients(q, k, v, mask, lam, block_q, block_k)
    print("  check", row)
    rows.append(row)
  return rows


def check_gradients(q, k, v, mask, lam, block_q: int, block_k: int) -> list[float]:
  """Relative errors of dq, dk, dv: bf16 Triton backward vs the VJP of the f32 jnp reference."""
  config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=True, backend="triton")
  d_out = jax.random.normal(jax.random.key(2), q.shape, jnp.float32)
  ours_grads = jax.vjp(lambda q, k, v: run_block_sparse(q, k, v, mask, config, lam=lam)[0], q, k, v)[1](
      d_out.astype(q.dtype))
  def reference(q, k, v):
    return block_sparse_attention_reference(q, k, v, mask, lam, causal=True, block_q=block_q, block_k=block_k,
                                            sm_scale=1.0 / math.sqrt(q.shape[-1]))[0]
  upcast = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_grads = jax.vjp(reference, *upcast)[1](d_out)
  return [relative_error(ours, ref) for ours, ref in zip(ours_grads, ref_grads)]


def sweep_launch_parameters(seq_len: int) -> list[dict[str, Any]]:
  """Dense-mode (every causal block kept) time per block size, num_stages and λ test (in or out)."""
  heads, head_dim = _HEADS.value, _HEAD_DIM.value
  q, k, v = random_qkv(0, seq_len, heads, head_dim)
  lam = jnp.full((heads,), -jnp.inf)
  rows = [dict(variant="cudnn", ms=time_jax(cudnn_dense, q, k, v))]
  ms, blocks = pallas_mha_best(q, k, v)
  rows.append(dict(variant="pallas_mha", ms=ms, blocks=blocks))
  print(" ", rows)
  for block in _BLOCKS.value:
    block_q, block_k = map(int, block.split("x"))
    valid, _ = block_geometry(seq_len, block_q, block_k)
    indices, counts = mask_to_kv_indices(jnp.broadcast_to(jnp.asarray(valid), (1, heads) + valid.shape))
    warps = (4, 8) if block_q < block_k else (4,) if block_q < 128 else (8,)
    for pv_skip, num_warps, num_stages in itertools.product((True, False), warps, (2, 3)):
      config = block_sparse_triton.LaunchConfig(num_warps=num_warps, num_stages=num_stages)
      kernel = jax.jit(functools.partial(
          block_sparse_triton._block_sparse_forward, causal=True, block_q=block_q,  # pylint: disable=protected-access
          block_k=block_k, sm_scale=1.0 / math.sqrt(head_dim), interpret=False, config=config,
          pv_skip=pv_skip))
      try:
        ms = time_jax(kernel, q, k, v, indices, counts, lam)
      except Exception as error:  # pylint: disable=broad-except
        print(f"  {block} {config} failed: {str(error)[:200]}")
        ms = math.nan
      rows.append(dict(variant="ours" if pv_skip else "ours_no_skip_logic", blocks=block,
                       num_warps=num_warps, num_stages=num_stages, ms=ms))
      print(" ", rows[-1])
  return rows


def bench_seq_len(seq_len: int) -> list[dict[str, Any]]:
  """Every contender at one sequence length; one row per (variant, block config, mask).

  Variants: `ours_<mask>` is the Triton kernel, `mosaic_gpu_<mask>` the Hopper kernel, on the same
  index lists; each row also carries FlexAttention on those lists (`flex_ms`, `vs_flex`).
  """
  heads, head_dim = _HEADS.value, _HEAD_DIM.value
  q, k, v = structured_qkv(seq_len, seq_len, heads, head_dim)
  cudnn_ms = time_jax(cudnn_dense, q, k, v)
  mha_ms, mha_blocks = pallas_mha_best(q, k, v)
  rows = [dict(seq_len=seq_len, variant="cudnn_dense", blocks="-", density=1.0, ms=cudnn_ms, vs_cudnn=1.0),
          dict(seq_len=seq_len, variant="pallas_mha", blocks=mha_blocks, density=1.0, ms=mha_ms,
               vs_cudnn=mha_ms / cudnn_ms)]
  print(f"T={seq_len}: cudnn {cudnn_ms:.3f} ms, mha {mha_ms:.3f} ms ({mha_blocks})")
  cudnn_bwd_ms = time_backward(cudnn_dense, q, k, v) if _BACKWARD.value else math.nan
  if _BACKWARD.value:
    rows[0]["bwd_ms"] = cudnn_bwd_ms
    print(f"T={seq_len}: cudnn backward {cudnn_bwd_ms:.3f} ms")
  flex = Flex(q, k, v) if _FLEX.value else None
  no_skip = jnp.full((heads,), -jnp.inf)
  for block in _BLOCKS.value:
    block_q, block_k = map(int, block.split("x"))
    valid, full = block_geometry(seq_len, block_q, block_k)
    kernels = {"ours": ours(block_q, block_k, head_dim)}
    mosaic_reason = mosaic_gpu_reason(block, head_dim)
    if mosaic_reason is None:
      kernels["mosaic_gpu"] = ours_mosaic_gpu(block_q, block_k, head_dim)
    else:
      rows.append(dict(seq_len=seq_len, variant="mosaic_gpu", blocks=block, density=math.nan, ms=math.nan,
                       note=f"not timed: {mosaic_reason}"))
    masks = [("all_kept", np.broadcast_to(valid, (1, heads) + valid.shape), None)]
    for density in map(float, _DENSITIES.value):
      masks.append(("predicted", *predicted_mask(q, k, density, block_q, block_k, valid)))
      masks.append(("random", random_mask(seq_len + block_q, density, heads, valid, full), None))
    for kind, mask, tau in masks:
      density = float(mask.sum() / (heads * valid.sum()))
      indices, counts = mask_to_kv_indices(jnp.asarray(mask))
      flex_row: dict[str, Any] = {}
      if flex is not None:
        flex_mask = flex.block_mask(mask, full, block_q, block_k)
        flex_ms, flex_out, flex_note = flex.run(flex_mask, block_q, block_k,
                                                budget_ms=_FLEX_IMPLAUSIBLE * density * cudnn_ms)
        flex_row = dict(flex_ms=flex_ms, flex_note=flex_note)
      for name, kernel in kernels.items():
        row = dict(seq_len=seq_len, variant=f"{name}_{kind}", blocks=block, density=density)
        try:
          ms = time_jax(kernel, q, k, v, indices, counts, no_skip)
        except Exception as error:  # pylint: disable=broad-except
          row.update(ms=math.nan, note=_error_line(error))
          print(f"  {name} {block} {kind} failed: {row['note']}")
          rows.append(row)
          continue
        if name == "mosaic_gpu":
          row["cta_loads_per_kept"] = cta_loads_per_kept(mask, block_q)
        row.update(ms=ms, vs_cudnn=ms / cudnn_ms, vs_mha=ms / mha_ms, vs_density_cudnn=ms / (density * cudnn_ms),
                   **flex_row)
        if flex_row:
          row["vs_flex"] = ms / flex_row["flex_ms"]
          if flex_out is not None and seq_len <= 8192:
            row["rel_diff_vs_flex"] = relative_error(kernel(q, k, v, indices, counts, no_skip)[0], flex_out)
        if _BACKWARD.value and name == "ours":
          bwd_ms = time_backward(ours_differentiable(block_q, block_k), q, k, v, jnp.asarray(mask))
          row.update(bwd_ms=bwd_ms, bwd_vs_density_cudnn=bwd_ms / (density * cudnn_bwd_ms))
          if flex is not None and flex_out is not None:
            flex_bwd_ms, flex_bwd_note = flex.run_backward(
                flex_mask, block_q, block_k, budget_ms=_FLEX_IMPLAUSIBLE * density * cudnn_bwd_ms)
            row.update(flex_bwd_ms=flex_bwd_ms, bwd_vs_flex=bwd_ms / flex_bwd_ms, flex_bwd_note=flex_bwd_note)
        if name == "ours" and kind == "predicted" and abs(density - 0.3) < 0.1:
          lam = jnp.full((heads,), _LAMBDA)
          skip_ms = time_jax(kernel, q, k, v, indices, counts, lam)
          skipped = kernel(q, k, v, indices, counts, lam)[1]
          rows.append(dict(seq_len=seq_len, variant=f"ours_predicted_lam{_LAMBDA:g}", blocks=block,
                           density=density, ms=skip_ms, vs_cudnn=skip_ms / cudnn_ms, vs_mha=skip_ms / mha_ms,
                           vs_density_cudnn=skip_ms / (density * cudnn_ms),
                           pv_skipped_fraction=float(skipped.sum() / counts.sum())))
        rows.append(row)
        print("  ", {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})
    # The rest of the sparse pipeline: mask prediction and index compaction (both methods, same output).
    tau = jnp.full((heads,), 0.5, jnp.float32)
    predict_ms = time_jax(predictor(block_q, block_k), q, k, tau)
    rows.append(dict(seq_len=seq_len, variant="predict_block_mask", blocks=block, density=math.nan,
                     ms=predict_ms, vs_cudnn=predict_ms / cudnn_ms))
    compact_mask = jnp.asarray(masks[-2][1])   # the predicted mask at the smallest density
    outputs = {}
    for method in ("argsort", "scatter"):
      compact_ms = time_jax(compaction(method), compact_mask)
      outputs[method] = compaction(method)(compact_mask)
      rows.append(dict(seq_len=seq_len, variant=f"mask_to_kv_indices_{method}", blocks=block,
                       density=float(compact_mask.sum() / (heads * valid.sum())), ms=compact_ms,
                       vs_cudnn=compact_ms / cudnn_ms,
                       predict_and_compact_vs_cudnn=(predict_ms + compact_ms) / cudnn_ms))
    identical = all(bool((a == b).all()) for a, b in zip(outputs["argsort"], outputs["scatter"]))
    rows[-1]["identical_to_argsort"] = rows[-2]["identical_to_argsort"] = identical
    for row in rows[-3:]:
      print("  ", row)
  return rows


def environment() -> dict[str, Any]:
  info = dict(gpu=jax.devices()[0].device_kind, jax=jax.__version__, python=platform.python_version())
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info.update(torch=torch.__version__, gpu_torch=torch.cuda.get_device_name())
  except Exception:  # pylint: disable=broad-except
    pass
  return info


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def _cell(value: Any, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _worst(values) -> float:
  """The largest finite value (NaN when none): a failed contender does not hide the others."""
  finite = [value for value in values if value is not None and math.isfinite(value)]
  return max(finite) if finite else math.nan


def write_markdown(results: dict[str, Any], path: str) -> None:
  cli.write_atomically(path, markdown(results))


def markdown(results: dict[str, Any]) -> str:
  """The Markdown report of `results` (the JSON this benchmark writes)."""
  env = results["environment"]
  lines = [
      "# Block-sparse attention kernel benchmark",
      "",
      f"GPU: {env.get('gpu')}; jax {env.get('jax')}; torch {env.get('torch', '-')}. Causal, bf16, batch 1, "
      f"{results['heads']} heads, head_dim {results['head_dim']}; median of {results['reps']} runs (ms).",
      "Generated by `python -m benchmarks.kernel_bench` from `kernel_bench.json`.",
      "",
      "Variants: `ours_*` = our Triton kernel, `mosaic_gpu_*` = our Hopper (Pallas Mosaic GPU) kernel, on the "
      "same kept-block lists; `*_all_kept` = every causal block (dense mode), `*_predicted` / `*_random` = "
      "SpargeAttn-predicted / random masks at the density shown. Ratios: `vs cuDNN` = ms / cuDNN dense (the "
      "dense-mode target: ≈ 1); `vs d·cuDNN` = ms / (density × cuDNN dense); `vs mha` = ms / Pallas mha "
      "(dense); `vs Flex` = ours / FlexAttention on the same block lists and block size (< 1: ours faster). "
      "Flex `-`: its compile failed (the note says why; never timed eagerly). "
      "`mask_to_kv_indices_*`: the two compactions of the smallest-density predicted mask (identical "
      "output); `pred+compact vs cuDNN` = (predict_block_mask + that compaction) / cuDNN dense. "
      "`CTA loads per kept block`: K/V tiles a 64-row Mosaic GPU CTA loads per block it computes (it walks the "
      "union of its two rows' lists).",
      "",
      "| T | variant | blocks | density | ms | vs cuDNN | vs d·cuDNN | vs mha | Flex ms | vs Flex | "
      "P·V skipped | note |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in results["rows"]:
    note = row.get("note", "")
    if "predict_and_compact_vs_cudnn" in row:
      note = (f"pred+compact vs cuDNN {row['predict_and_compact_vs_cudnn']:.3f}; identical: "
              f"{row.get('identical_to_argsort')}")
    elif math.isnan(row.get("flex_ms", 0.0)):
      note = f"flex: {row.get('flex_note', '')[:160]}"
    if row.get("cta_loads_per_kept", 1.0) != 1.0:  # the union of a 64-row CTA's two lists
      note = f"CTA loads per kept block {row['cta_loads_per_kept']:.2f}" + (f"; {note}" if note else "")
    lines.append("| " + " | ".join([
        str(row["seq_len"]), row["variant"], row["blocks"], _cell(row.get("density"), 3),
        _cell(row["ms"]), _cell(row.get("vs_cudnn"), 3), _cell(row.get("vs_density_cudnn"), 2),
        _cell(row.get("vs_mha"), 2), _cell(row.get("flex_ms")), _cell(row.get("vs_flex"), 2),
        _cell(row.get("pv_skipped_fraction"), 3), note.replace("|", "/"),
    ]) + " |")
  lines += ["", "## Targets per (T, kernel, blocks): dense mode and the worst sparse ratio (λ = -inf)", "",
            "| T | kernel | blocks | all kept vs cuDNN (≤ 1.05) | max vs d·cuDNN (≤ 1.15) "
            "| max vs Flex (≤ 1/1.3 = 0.77) |",
            "|---|---|---|---|---|---|"]
  groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
  timed = {f"{kernel}_{kind}": kernel for kernel in ("ours", "mosaic_gpu")
           for kind in ("all_kept", "predicted", "random")}
  for row in results["rows"]:
    if row["variant"] in timed:
      groups.setdefault((row["seq_len"], timed[row["variant"]], row["blocks"]), []).append(row)
  for (seq_len, kernel, blocks), rows in groups.items():
    dense = [row.get("vs_cudnn") for row in rows if row["variant"].endswith("all_kept")]
    sparse = [row for row in rows if not row["variant"].endswith("all_kept")]
    worst_cudnn = _worst(row.get("vs_density_cudnn") for row in sparse)
    worst_flex = _worst(row.get("vs_flex") for row in sparse)
    lines.append(f"| {seq_len} | {'triton' if kernel == 'ours' else kernel} | {blocks} | "
                 f"{_cell(dense[0] if dense else None, 3)} | {_cell(worst_cudnn, 2)} | {_cell(worst_flex, 2)} |")
  skipped = sorted({(row["blocks"], row["note"]) for row in results["rows"] if row["variant"] == "mosaic_gpu"})
  for blocks, note in skipped:
    lines.append(f"| - | mosaic_gpu | {blocks} | {note} | | |")
  backward_rows = [row for row in results["rows"] if "bwd_ms" in row]
  if backward_rows:
    lines += ["", "## Backward pass (dq, dk, dv from saved residuals; λ = -inf)", "",
              "`vs d·cuDNN` = ours / (density × cuDNN dense backward); `vs Flex` = ours / FlexAttention's "
              "backward on the same block lists (< 1: ours faster).", "",
              "| T | variant | blocks | density | bwd ms | vs d·cuDNN | Flex bwd ms | vs Flex |",
              "|---|---|---|---|---|---|---|---|"]
    for row in backward_rows:
      lines.append("| " + " | ".join([
          str(row["seq_len"]), row["variant"], row["blocks"], _cell(row.get("density"), 3),
          _cell(row["bwd_ms"]), _cell(row.get("bwd_vs_density_cudnn"), 2), _cell(row.get("flex_bwd_ms")),
          _cell(row.get("bwd_vs_flex"), 2)]) + " |")
  if results.get("check"):
    lines += ["", "## GPU correctness (bf16 kernel vs f32 reference; per-head λ in [-8, -0.5], one -inf)",
              "",
              "| case (T, S, H, KH, D, bq, bk) | rel. error | P·V skipped (ours / ref) | mismatched rows |",
              "|---|---|---|---|"]
    for row in results["check"]:
      lines.append(f"| {tuple(row['case'])} | {row['rel_error']:.2e} | {row['skipped']} / "
                   f"{row['ref_skipped']} | {row['skip_count_mismatches']} |")
    if any("grad_rel_error" in row for row in results["check"]):
      lines += ["", "Gradients (bf16 Triton backward vs the f32 reference's VJP), rel. error of dq, dk, dv:",
                "", "| case | dq | dk | dv |", "|---|---|---|---|"]
      for row in results["check"]:
        if "grad_rel_error" in row:
          lines.append(f"| {tuple(row['case'])} | " + " | ".join(f"{e:.2e}" for e in row["grad_rel_error"])
                       + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  markdown_path = os.path.splitext(_OUT.value)[0] + ".md"
  if _MARKDOWN_ONLY.value:
    with open(_OUT.value) as file:
      write_markdown(json.load(file), markdown_path)
    return
  env = environment()
  print(env)
  if _MODE.value == "sweep":
    for seq_len in map(int, _SEQ_LENS.value):
      sweep_launch_parameters(seq_len)
    return
  warm_up_gpu()
  check = check_against_reference() if _CHECK.value or _MODE.value == "check" else []
  if _MODE.value == "check":
    return
  results = dict(environment=env, heads=_HEADS.value, head_dim=_HEAD_DIM.value, reps=_REPS.value,
                 check=check, rows=[])
  if _APPEND.value and os.path.exists(_OUT.value):
    with open(_OUT.value) as file:
      earlier = json.load(file)
    results.update(check=earlier["check"] + check, rows=earlier["rows"])
  warm_up_gpu()
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  for seq_len in map(int, _SEQ_LENS.value):
    results["rows"] += bench_seq_len(seq_len)
    # After every length, so a cut-off run keeps what it has.
    cli.write_results(results, _OUT.value, markdown)
  with open(markdown_path) as file:
    print(file.read())


if __name__ == "__main__":
  cli.run(main, FLAGS)
