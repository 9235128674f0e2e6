"""Times the Triton block-sparse attention kernel against cuDNN, Pallas mha and FlexAttention on one GPU.

For causal bf16 attention (batch 1, 32 heads, head_dim 128) at each sequence length it times dense cuDNN,
Pallas `mha` (its best block sizes), our kernel with every block kept, our kernel at block densities ≈ 0.5 /
0.3 / 0.15 on masks predicted by `predict_block_mask` from structured q/k (planted locality and heavy
columns, τ bisected per head to hit the density) and on random masks with the diagonal kept, mask
prediction alone, and torch FlexAttention on the very same block lists. It also checks the kernel against
the jnp reference on the GPU. Modes: `full` (the table), `check` (correctness only), `sweep` (Triton
launch parameters). `--backward` adds the backward pass: the time of dq, dk, dv alone (the VJP applied to
saved residuals) for cuDNN, our kernels and FlexAttention on the same block lists, and in the check a
comparison of our gradients with the VJP of the f32 jnp reference. Run from the repository root:

  python -m benchmarks.kernel_bench --mode=full --seq_lens=4096,16384,32768
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

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from kernels import block_sparse_triton
from kernels.block_config import BlockSparseConfig
from kernels.block_index import causal_block_mask, mask_to_kv_indices
from kernels.block_sparse import run_block_sparse
from kernels.block_sparse_reference import block_sparse_attention_reference
from kernels.sparge import predict_block_mask
from kernels.sparge import SpargeParams
# pylint: enable=g-import-not-at-top,wrong-import-position

_MODE = flags.DEFINE_enum("mode", "full", ["full", "check", "sweep"], "What to run.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "16384", "32768"], "T = S values.")
_BLOCKS = flags.DEFINE_list("blocks", ["64x64", "64x128", "128x128"], "block_q x block_k configs.")
_DENSITIES = flags.DEFINE_list("densities", ["0.5", "0.3", "0.15"], "Target block densities.")
_HEADS = flags.DEFINE_integer("heads", 32, "Query (= kv) heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions (median reported).")
_FLEX = flags.DEFINE_bool("flex", True, "Also time torch FlexAttention on the same block lists.")
_OUT = flags.DEFINE_string("out", "results/kernel_bench.json", "Where the JSON goes (.md beside it).")
_MARKDOWN_ONLY = flags.DEFINE_bool("markdown_only", False, "Only regenerate the .md from --out.")
_APPEND = flags.DEFINE_bool("append", False, "Add these sequence lengths to the rows already in --out.")
_CHECK = flags.DEFINE_bool("check", True, "Check the kernel against the reference before timing.")
_BACKWARD = flags.DEFINE_bool("backward", False, "Also time (and check) the backward pass: dq, dk, dv.")

_DTYPE = jnp.bfloat16
_MHA_BLOCKS = ((64, 64), (128, 64), (128, 128))
_LAMBDA = -2.0  # the λ of the P·V-skip timing row


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------

# Each timed repetition runs this many calls back to back, so host dispatch overlaps device work.
_CALLS_PER_REP = 5


def time_jax(fn: Callable[..., Any], *args, warmup: int = 2) -> float:
  """Median ms per call of `fn(*args)` after compilation and warm-up (wall clock, synchronised)."""
  for _ in range(1 + warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    for _ in range(_CALLS_PER_REP):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / _CALLS_PER_REP)
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


@functools.lru_cache(maxsize=None)
def ours_differentiable(block_q: int, block_k: int) -> Callable[..., jax.Array]:
  """The front door (mask -> out) on the Triton backend; differentiable, λ = -inf."""
  config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=True, backend="triton")
  return jax.jit(lambda q, k, v, mask: run_block_sparse(q, k, v, mask, config)[0])


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


class Flex:
  """torch FlexAttention over the same kept-block lists (full blocks unmasked, diagonal blocks causal)."""

  def __init__(self, q, k, v):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.attention import flex_attention as flex  # pylint: disable=g-import-not-at-top
    self.torch, self.flex = torch, flex
    self.compiled = torch.compile(flex.flex_attention)
    # [B, T, H, D] -> [B, H, T, D]
    self.q, self.k, self.v = (torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
    self.kernel_options = None  # the options of the last successful `run`

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

  def run(self, block_mask, block_q: int, block_k: int):
    """(ms, output as jax array); the kernel tile sizes must divide the sparse block sizes."""
    options = [None, {"BLOCK_M": block_q, "BLOCK_N": min(block_k, 64)}]
    for kernel_options in options:
      try:
        fn = lambda: self.compiled(self.q, self.k, self.v, block_mask=block_mask,
                                   kernel_options=kernel_options)
        out = fn()
        self.kernel_options = kernel_options
        return time_torch(fn), jnp.asarray(out.permute(0, 2, 1, 3).float().cpu().numpy())
      except Exception as error:  # pylint: disable=broad-except
        print(f"  flex {kernel_options} failed: {type(error).__name__}: {str(error)[:300]}")
    return math.nan, None

  def run_backward(self, block_mask) -> float:
    """ms of the backward pass alone (autograd on a retained graph), with the options `run` settled on."""
    torch = self.torch
    try:
      q, k, v = (x.detach().requires_grad_() for x in (self.q, self.k, self.v))
      out = self.compiled(q, k, v, block_mask=block_mask, kernel_options=self.kernel_options)
      d_out = torch.randn_like(out)
      return time_torch(lambda: torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True))
    except Exception as error:  # pylint: disable=broad-except
      print(f"  flex backward failed: {type(error).__name__}: {str(error)[:300]}")
      return math.nan


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
  """Every contender at one sequence length; one row per (variant, block config, mask)."""
  heads, head_dim = _HEADS.value, _HEAD_DIM.value
  q, k, v = structured_qkv(seq_len, seq_len, heads, head_dim)
  cudnn_ms = time_jax(cudnn_dense, q, k, v)
  mha_ms, mha_blocks = pallas_mha_best(q, k, v)
  rows = [dict(seq_len=seq_len, variant="cudnn_dense", blocks="-", density=1.0, ms=cudnn_ms),
          dict(seq_len=seq_len, variant="pallas_mha", blocks=mha_blocks, density=1.0, ms=mha_ms)]
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
    kernel = ours(block_q, block_k, head_dim)
    masks = [("all_kept", np.broadcast_to(valid, (1, heads) + valid.shape), None)]
    for density in map(float, _DENSITIES.value):
      masks.append(("predicted", *predicted_mask(q, k, density, block_q, block_k, valid)))
      masks.append(("random", random_mask(seq_len + block_q, density, heads, valid, full), None))
    for kind, mask, tau in masks:
      density = float(mask.sum() / (heads * valid.sum()))
      indices, counts = mask_to_kv_indices(jnp.asarray(mask))
      ms = time_jax(kernel, q, k, v, indices, counts, no_skip)
      row = dict(seq_len=seq_len, variant=f"ours_{kind}", blocks=block, density=density, ms=ms,
                 vs_mha=ms / mha_ms, vs_density_cudnn=ms / (density * cudnn_ms))
      if flex is not None:
        flex_mask = flex.block_mask(mask, full, block_q, block_k)
        flex_ms, flex_out = flex.run(flex_mask, block_q, block_k)
        row.update(flex_ms=flex_ms, vs_flex=ms / flex_ms)
        if flex_out is not None and seq_len <= 4096:
          row["rel_diff_vs_flex"] = relative_error(kernel(q, k, v, indices, counts, no_skip)[0], flex_out)
      if _BACKWARD.value:
        bwd_ms = time_backward(ours_differentiable(block_q, block_k), q, k, v, jnp.asarray(mask))
        row.update(bwd_ms=bwd_ms, bwd_vs_density_cudnn=bwd_ms / (density * cudnn_bwd_ms))
        if flex is not None and flex_out is not None:
          flex_bwd_ms = flex.run_backward(flex_mask)
          row.update(flex_bwd_ms=flex_bwd_ms, bwd_vs_flex=bwd_ms / flex_bwd_ms)
      if kind == "predicted" and abs(density - 0.3) < 0.1:
        lam = jnp.full((heads,), _LAMBDA)
        skip_ms = time_jax(kernel, q, k, v, indices, counts, lam)
        skipped = kernel(q, k, v, indices, counts, lam)[1]
        rows.append(dict(seq_len=seq_len, variant=f"ours_predicted_lam{_LAMBDA:g}", blocks=block,
                         density=density, ms=skip_ms, vs_mha=skip_ms / mha_ms,
                         vs_density_cudnn=skip_ms / (density * cudnn_ms),
                         pv_skipped_fraction=float(skipped.sum() / counts.sum())))
      rows.append(row)
      print("  ", {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})
    # The rest of the sparse pipeline: mask prediction and index compaction.
    tau = jnp.full((heads,), 0.5, jnp.float32)
    rows.append(dict(seq_len=seq_len, variant="predict_block_mask", blocks=block, density=math.nan,
                     ms=time_jax(predictor(block_q, block_k), q, k, tau)))
    compact = jax.jit(mask_to_kv_indices)
    rows.append(dict(seq_len=seq_len, variant="mask_to_kv_indices", blocks=block, density=math.nan,
                     ms=time_jax(compact, jnp.asarray(masks[-1][1]))))
    print("  ", rows[-2], rows[-1])
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


def write_markdown(results: dict[str, Any], path: str) -> None:
  env = results["environment"]
  lines = [
      "# Block-sparse attention kernel benchmark",
      "",
      f"GPU: {env.get('gpu')}; jax {env.get('jax')}; torch {env.get('torch', '-')}. Causal, bf16, batch 1, "
      f"{results['heads']} heads, head_dim {results['head_dim']}; median of {results['reps']} runs (ms).",
      "Generated by `python -m benchmarks.kernel_bench` from `kernel_bench.json`.",
      "",
      "Ratios: `vs mha` = ours / Pallas mha (dense); `vs d·cuDNN` = ours / (density × cuDNN dense); "
      "`vs Flex` = ours / FlexAttention on the same block lists and block size (< 1: ours faster).",
      "",
      "| T | variant | blocks | density | ms | vs mha | vs d·cuDNN | Flex ms | vs Flex | P·V skipped |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in results["rows"]:
    lines.append("| " + " | ".join([
        str(row["seq_len"]), row["variant"], row["blocks"], _cell(row.get("density"), 3),
        _cell(row["ms"]), _cell(row.get("vs_mha"), 2), _cell(row.get("vs_density_cudnn"), 2),
        _cell(row.get("flex_ms")), _cell(row.get("vs_flex"), 2), _cell(row.get("pv_skipped_fraction"), 3),
    ]) + " |")
  lines += ["", "## Targets per (T, blocks): worst ratio over the sparse rows (λ = -inf)", "",
            "| T | blocks | dense vs mha (≤ 1.1) | max vs d·cuDNN (≤ 1.2) | max vs Flex (< 1) |",
            "|---|---|---|---|---|"]
  groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
  for row in results["rows"]:
    if row["variant"] in ("ours_all_kept", "ours_predicted", "ours_random"):
      groups.setdefault((row["seq_len"], row["blocks"]), []).append(row)
  for (seq_len, blocks), rows in groups.items():
    dense = [row["vs_mha"] for row in rows if row["variant"] == "ours_all_kept"]
    sparse = [row for row in rows if row["variant"] != "ours_all_kept"]
    worst_cudnn = max(row["vs_density_cudnn"] for row in sparse)
    worst_flex = max((row.get("vs_flex", math.nan) for row in sparse), default=math.nan)
    lines.append(f"| {seq_len} | {blocks} | {_cell(dense[0] if dense else None, 2)} | "
                 f"{_cell(worst_cudnn, 2)} | {_cell(worst_flex, 2)} |")
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
  with open(path, "w") as file:
    file.write("\n".join(lines) + "\n")


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
    with open(_OUT.value, "w") as file:  # after every length, so a cut-off run keeps what it has
      json.dump(results, file, indent=1)
    write_markdown(results, markdown_path)
  with open(markdown_path) as file:
    print(file.read())


if __name__ == "__main__":
  app.run(main)
