"""The Mosaic GPU (Hopper) block-sparse kernel on CPU: its interpreter, CUDA lowering, the registry's choice.

A CPU cannot run the kernel, so it is checked three ways here: (1) Mosaic GPU's interpreter (jax >= 0.10;
simulated SMEM, TMA, mbarriers and the three warpgroups; wgmma replaced by `dot_general`, see the module
docstring) against the jnp reference and the float64 oracle on small shapes that cover GQA, ragged and
T != S lengths, causal and not, both block shapes, a ring that wraps, and empty rows; (2) lowering for CUDA
without a GPU, which runs the real (wgmma, layouts, TMA) code through Pallas' Mosaic GPU lowering; (3) the
registry: "auto" never picks it where it cannot run, and naming it where it cannot run says what is allowed.
`benchmarks/mosaic_gpu_check.py` is the on-GPU check (compiled kernel vs f32 reference, every case class).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse_mosaic_gpu as mgpu
from kernels.block_config import BACKEND_REGISTRY, BlockConfigError, BlockSparseConfig
from kernels.block_index import mask_to_kv_indices
from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse_mosaic_gpu import block_sparse_attention_mosaic_gpu
from kernels.block_sparse_reference import block_sparse_attention_reference
from kernels.block_sparse_triton import block_sparse_attention_triton
from tests.kernels import _oracles

BF16_REL_TOL = 2e-2

needs_interpreter = pytest.mark.skipif(mgpu.interpret_params() is None,
                                       reason=f"jax {jax.__version__} has no Mosaic GPU interpret mode")
# The interpreter and the lowering for CUDA stand in for the compiled kernel on CPU hosts; on a GPU the
# compiled kernel itself is checked by `benchmarks/mosaic_gpu_check.py` (every case class, committed JSON).
cpu_host_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                                   reason="a CPU stand-in; benchmarks/mosaic_gpu_check.py checks the GPU")
needs_plgpu = pytest.mark.skipif(mgpu._plgpu() is None,  # pylint: disable=protected-access
                                 reason=f"jax {jax.__version__} has no Pallas Mosaic GPU API")


def _inputs(seed, *, q_len, kv_len, heads, kv_heads, head_dim=64, causal, block_q, block_k,
            dtype=jnp.bfloat16, keep=0.6):
  """(q, k, v, mask): random bf16 inputs and a random causal-ANDed mask whose head 0, q block 0 is empty."""
  q, k, v = _oracles.random_qkv(seed, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, dtype=dtype)
  valid = _oracles.causal_valid_blocks(q_len, kv_len, causal, block_q, block_k)
  mask = (np.random.default_rng(seed).random((1, heads) + valid.shape) < keep) & valid
  mask[0, 0, 0] = False
  return q, k, v, mask


def _kernel(q, k, v, mask, lam, *, causal, block_q, block_k, interpret=True, **kwargs):
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))
  return block_sparse_attention_mosaic_gpu(
      q, k, v, indices, counts, jnp.asarray(lam, jnp.float32), causal=causal, block_q=block_q,
      block_k=block_k, sm_scale=1.0 / math.sqrt(q.shape[-1]), interpret=interpret, **kwargs)


# (q_len, kv_len, heads, kv_heads, block_q, block_k, causal). The interpreter's time goes by CTAs (heads x
# 128-row query tiles, ~5 s of CPU each), not by kept blocks, so each case has the fewest CTAs that still
# show its feature: two each (the first was 4 CTAs, the second 3).
INTERPRET_CASES = [
    (100, 200, 2, 1, 64, 128, True),      # 64 x 128, GQA, ragged, T < S: two mask rows per CTA (head 1's
                                          # keep the same 2 blocks, head 0's first row none)
    (220, 150, 1, 1, 128, 128, True),     # 128 x 128, ragged, T > S: leading rows see no key, output 0;
                                          # the second CTA's rows 128..197 see key block 0 only
    (256, 512, 1, 1, 128, 64, False),     # 128 x 64, not causal: 6 kept blocks wrap the 3-slot ring
]


@cpu_host_only
@needs_interpreter
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: "T{}_S{}_H{}_K{}_bq{}_bk{}_{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_interpreted_kernel_matches_reference_and_oracle(case):
  q_len, kv_len, heads, kv_heads, block_q, block_k, causal = case
  q, k, v, mask = _inputs(sum(case[:6]), q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
                          causal=causal, block_q=block_q, block_k=block_k)
  lam = np.full(heads, -np.inf, np.float32)
  out, pv_skipped = _kernel(q, k, v, mask, lam, causal=causal, block_q=block_q, block_k=block_k)
  ref, ref_skipped = block_sparse_attention_reference(
      q, k, v, jnp.asarray(mask), jnp.asarray(lam), causal=causal, block_q=block_q, block_k=block_k,
      sm_scale=1.0 / math.sqrt(q.shape[-1]))
  oracle, _ = _oracles.block_skip_attention(q, k, v, mask, lam, causal=causal, block_q=block_q,
                                            block_k=block_k)

  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_array_equal(np.asarray(pv_skipped), np.asarray(ref_skipped))
  out32 = np.asarray(out.astype(jnp.float32))
  assert np.isfinite(out32).all()
  assert _oracles.relative_error(out, np.asarray(ref.astype(jnp.float32))) <= BF16_REL_TOL
  assert _oracles.relative_error(out, oracle) <= BF16_REL_TOL
  np.testing.assert_array_equal(out32[0, :block_q, 0], 0.0)          # the empty row
  if q_len > kv_len and causal:
    np.testing.assert_array_equal(out32[0, :q_len - kv_len], 0.0)   # rows that see no key


@pytest.mark.parametrize("block_q, block_k", [(64, 128), (128, 128)])
def test_lambda_and_residual_calls_run_the_triton_kernel(block_q, block_k):
  """λ > -inf somewhere (the P·V skip) and the forward of jax.grad are the Triton kernel's results."""
  q, k, v, mask = _inputs(3, q_len=128, kv_len=128, heads=2, kv_heads=1, causal=True, block_q=block_q,
                          block_k=block_k, keep=1.0)
  lam = np.asarray([-0.5, -np.inf], np.float32)
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))
  statics = dict(causal=True, block_q=block_q, block_k=block_k, sm_scale=0.125, interpret=True)
  triton = block_sparse_attention_triton(q, k, v, indices, counts, jnp.asarray(lam), **statics)
  # Under interpret=True the λ branch is the Triton kernel in Pallas interpret mode; the λ-free branch of
  # the same lax.cond is never run here (only traced), so this stays fast.
  ours = block_sparse_attention_mosaic_gpu(q, k, v, indices, counts, jnp.asarray(lam), **statics)
  for a, b in zip(ours, triton):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  residuals = block_sparse_attention_mosaic_gpu(q, k, v, indices, counts, jnp.asarray(lam),
                                                return_residuals=True, **statics)
  assert len(residuals) == 4


@cpu_host_only
@needs_plgpu
@pytest.mark.parametrize("block_q, block_k, causal, dtype, head_dim", [
    (64, 128, True, jnp.bfloat16, 128),
    (128, 128, True, jnp.float16, 128),
    (128, 64, False, jnp.bfloat16, 64),
])
def test_lowers_for_cuda_without_a_gpu(block_q, block_k, causal, dtype, head_dim):
  """The compiled path (wgmma, TMA, layouts, run_state) goes through Pallas' Mosaic GPU lowering."""
  q, k, v, mask = _inputs(1, q_len=200, kv_len=260, heads=4, kv_heads=2, head_dim=head_dim, causal=causal,
                          block_q=block_q, block_k=block_k, dtype=dtype)
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))

  def forward(q, k, v, indices, counts):
    return mgpu._mosaic_forward(q, k, v, indices, counts, causal=causal, block_q=block_q,  # pylint: disable=protected-access
                                block_k=block_k, sm_scale=0.1, interpret=None)
  lowered = jax.jit(forward).trace(q, k, v, indices, counts).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in lowered.as_text()


def test_cta_lists_encode_the_union_and_membership():
  """64-row q blocks: a CTA walks the union of its two rows' lists, bit w marking warpgroup w's blocks."""
  mask = np.zeros((1, 1, 3, 4), bool)
  mask[0, 0, 0] = [1, 0, 1, 0]
  mask[0, 0, 1] = [0, 0, 1, 1]
  mask[0, 0, 2] = [0, 1, 0, 0]
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))
  entries, cta_counts, plain = mgpu._cta_lists(  # pylint: disable=protected-access
      indices, counts, block_q=64, block_k=64, causal=False, q_len=160, kv_len=250, n_cta=2)
  np.testing.assert_array_equal(np.asarray(cta_counts), [[[3, 1]]])
  np.testing.assert_array_equal(np.asarray(entries)[0, 0, 0, :3], [4 * 0 + 1, 4 * 2 + 3, 4 * 3 + 2])
  np.testing.assert_array_equal(np.asarray(entries)[0, 0, 1, :1], [4 * 1 + 1])   # row 3 is padding
  # kv_len 250 = 3 full 64-key blocks + a ragged one: block 3 is masked for every warpgroup.
  np.testing.assert_array_equal(np.asarray(plain), [[[[2, 2], [1, 1]]]])


def test_auto_never_picks_it_where_it_cannot_run():
  config = BlockSparseConfig(64, 128, backend="auto")
  assert config.for_platform("cpu")[0].backend == "reference"
  expected = "mosaic_gpu" if mgpu.supported(block_q=64, block_k=128, head_dim=128,
                                            dtype=jnp.bfloat16, causal=True) else "triton"
  assert config.for_platform("gpu", head_dim=128, dtype=jnp.bfloat16)[0].backend == expected
  # Shapes it does not take go to Triton on any GPU.
  for head_dim, dtype, blocks in ((96, jnp.bfloat16, (64, 128)), (128, jnp.float32, (64, 128)),
                                  (128, jnp.bfloat16, (32, 128))):
    resolved, _ = BlockSparseConfig(*blocks).for_platform("gpu", head_dim=head_dim, dtype=dtype)
    assert resolved.backend == "triton"
  names = list(BACKEND_REGISTRY)
  assert names.index("mosaic_gpu") < names.index("triton")
  if jax.default_backend() != "gpu":
    assert not mgpu.supported() and "not a GPU" in mgpu.platform_reason()


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=32, block_k=128), r"block_q must be one of \(64, 128\) and block_k one of \(64, 128\)"),
    (dict(block_q=64, block_k=256), r"block_k one of \(64, 128\); got block_q=64, block_k=256"),
    (dict(head_dim=96), r"head_dim must be one of \(64, 128\); got 96"),
    (dict(dtype=jnp.float32), "bfloat16 or float16; got float32"),
])
def test_unsupported_layouts_name_what_is_allowed(kwargs, match):
  blocks = dict(block_q=kwargs.pop("block_q", 64), block_k=kwargs.pop("block_k", 128))
  assert mgpu.shape_reason(**blocks, **kwargs) is not None
  # Named explicitly on a GPU platform: the registry raises the reason (checked before the platform's).
  with pytest.raises(BlockConfigError, match=match):
    BlockSparseConfig(**blocks, backend="mosaic_gpu").for_platform(
        "gpu", head_dim=kwargs.get("head_dim", 128), dtype=kwargs.get("dtype", jnp.bfloat16))


def test_kernel_rejects_unsupported_inputs():
  q, k, v, mask = _inputs(0, q_len=64, kv_len=64, heads=2, kv_heads=1, causal=True, block_q=64,
                          block_k=64, dtype=jnp.float32)
  with pytest.raises(ValueError, match="bfloat16 or float16; got float32.*backend='triton'"):
    _kernel(q, k, v, mask, np.full(2, -np.inf), causal=True, block_q=64, block_k=64)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU message")
def test_named_on_cpu_says_it_needs_a_gpu():
  q, k, v, mask = _inputs(0, q_len=64, kv_len=64, heads=2, kv_heads=1, causal=True, block_q=64,
                          block_k=64)
  with pytest.raises(BlockConfigError, match="needs a GPU"):
    block_sparse_attention(q, k, v, mask, block_q=64, block_k=64, backend="mosaic_gpu")
  with pytest.raises(ValueError, match="cannot run here: the default platform is 'cpu'"):
    _kernel(q, k, v, mask, np.full(2, -np.inf), causal=True, block_q=64, block_k=64, interpret=False)
