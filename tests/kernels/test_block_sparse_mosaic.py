"""The Mosaic (TPU) block-sparse kernel on CPU: Pallas interpret mode, the TPU simulator, TPU lowering.

Every case is checked twice: against the jnp reference `kernels.sparge_reference` (the semantics the kernel
must match) and against the float64 brute-force oracle in `tests.kernels._oracles` (which shares no code with
either). Shapes are tiny but cover what the kernel has to get right: GQA, T != S, ragged lengths, causal
alignment, per-head λ including -inf, random masks with empty rows, grid shrinking and SMEM batch splits.
Lowering for a TPU (without one) checks the block shapes and that every op has a Mosaic rule.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import block_sparse_mosaic
from kernels.block_index import mask_to_kv_indices
from kernels.block_sparse_mosaic import block_sparse_attention_mosaic
from kernels.sparge_reference import block_sparse_attention_reference
from tests.kernels import _oracles

F32_ABS_TOL = 1e-5
BF16_REL_TOL = 2e-2


@dataclasses.dataclass(frozen=True)
class Case:
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  causal: bool
  block_q: int = 16
  block_k: int = 16
  batch: int = 1
  head_dim: int = 16
  dtype: str = "float32"
  keep_fraction: float = 0.7
  # The public API ANDs masks with the causal-valid blocks; a kept block with no unmasked element must
  # still be a no-op (neither computed nor counted as skipped) when a caller does not.
  only_causal_valid: bool = True
  seed: int = 0

  @property
  def n_q_blocks(self) -> int:
    return math.ceil(self.q_len / self.block_q)

  @property
  def n_k_blocks(self) -> int:
    return math.ceil(self.kv_len / self.block_k)


CASES = {
    "mha_causal_square": Case(q_len=64, kv_len=64, heads=2, kv_heads=2, causal=True),
    "gqa4_2_ragged_noncausal": Case(q_len=40, kv_len=57, heads=4, kv_heads=2, causal=False, block_k=8),
    # Fewer queries than keys: the causal diagonal sits to the right of the square one.
    "gqa9_3_causal_fewer_queries": Case(q_len=21, kv_len=70, heads=9, kv_heads=3, causal=True, block_q=8,
                                        block_k=32, seed=1),
    # More queries than keys: the first q block has no key at all, the second only for some rows.
    "mqa_causal_more_queries_batch2": Case(q_len=50, kv_len=30, heads=2, kv_heads=1, causal=True,
                                           block_k=8, batch=2, only_causal_valid=False, seed=2),
    "bf16_gqa_causal": Case(q_len=48, kv_len=64, heads=4, kv_heads=2, causal=True, dtype="bfloat16",
                            seed=6),
    "bf16_ragged_noncausal": Case(q_len=37, kv_len=45, heads=2, kv_heads=1, causal=False,
                                  dtype="bfloat16", head_dim=32, block_k=8, seed=6),
}

# One λ per head, cycled: never skip, then increasingly eager skipping (λ closer to 0 skips more).
LAMBDAS = (-math.inf, -6.0, -2.0, -0.5)


def _peaky_qkv(case: Case):
  """q, k, v whose key blocks differ in overall logit level, so that λ has tiles to skip.

  A shared unit direction is added to every query and, with a random strength per key block, to the
  keys: each key block's logits shift by up to a few nats, which is what makes later blocks fall below
  the running max by more than |λ|.
  """
  q, k, v = _oracles.random_qkv(case.seed, batch=case.batch, q_len=case.q_len, kv_len=case.kv_len,
                                heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim)
  rng = np.random.default_rng(case.seed + 100)
  direction = rng.standard_normal(case.head_dim)
  direction /= np.linalg.norm(direction)
  block_level = rng.uniform(-3.0, 3.0, size=case.n_k_blocks)
  key_level = np.repeat(block_level, case.block_k)[:case.kv_len]
  q = q + 3.0 * math.sqrt(case.head_dim) * direction
  k = k + key_level[None, :, None, None] * direction
  dtype = jnp.dtype(case.dtype)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _random_mask(case: Case) -> np.ndarray:
  """bool [batch, heads, n_q_blocks, n_k_blocks] with some empty rows, by default only causal-valid blocks."""
  rng = np.random.default_rng(case.seed + 200)
  shape = (case.batch, case.heads, case.n_q_blocks, case.n_k_blocks)
  mask = rng.random(shape) < case.keep_fraction
  mask[:, 0, -1, :] = False  # an empty row, on purpose
  if not case.only_causal_valid:
    return mask
  return mask & _oracles.causal_valid_blocks(case.q_len, case.kv_len, case.causal, case.block_q,
                                             case.block_k)


def _lambdas(heads: int) -> jnp.ndarray:
  return jnp.asarray([LAMBDAS[h % len(LAMBDAS)] for h in range(heads)], jnp.float32)


def _run_kernel(case: Case, q, k, v, mask, lam, interpret=False):
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))
  return block_sparse_attention_mosaic(
      q, k, v, indices, counts, lam, causal=case.causal, block_q=case.block_q, block_k=case.block_k,
      sm_scale=1.0 / math.sqrt(case.head_dim), interpret=interpret)


def _run_reference(case: Case, q, k, v, mask, lam):
  return block_sparse_attention_reference(
      q, k, v, jnp.asarray(mask), lam, causal=case.causal, block_q=case.block_q, block_k=case.block_k,
      sm_scale=1.0 / math.sqrt(case.head_dim))


def _assert_close(case: Case, actual, expected, what: str) -> None:
  if case.dtype == "float32":
    error = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))
    assert error <= F32_ABS_TOL, f"{what}: max abs error {error:.3g} > {F32_ABS_TOL}"
  else:
    error = _oracles.relative_error(actual, np.asarray(jnp.asarray(expected, jnp.float32)))
    assert error <= BF16_REL_TOL, f"{what}: relative error {error:.3g} > {BF16_REL_TOL}"


# The TPU simulator also models the index-map DMAs, NaN-filled scratch and out-of-bounds reads, but costs
# far more per grid step than the generic interpreter, so it runs on one case: GQA with ragged T and S.
INTERPRETERS = [(name, False) for name in CASES] + [("gqa4_2_ragged_noncausal", "tpu_simulator")]


@pytest.mark.parametrize("name, interpreter", INTERPRETERS)
def test_matches_reference_and_oracle(name, interpreter):
  case = CASES[name]
  q, k, v = _peaky_qkv(case)
  mask = _random_mask(case)
  lam = _lambdas(case.heads)
  interpret = block_sparse_mosaic.tpu_interpret_params() if interpreter == "tpu_simulator" else False

  out, pv_skipped = _run_kernel(case, q, k, v, mask, lam, interpret=interpret)
  ref_out, ref_skipped = _run_reference(case, q, k, v, mask, lam)
  oracle_out, oracle_skipped = _oracles.block_skip_attention(
      q, k, v, mask, lam, causal=case.causal, block_q=case.block_q, block_k=case.block_k)

  assert out.shape == q.shape and out.dtype == q.dtype
  assert pv_skipped.shape == mask.shape[:3] and pv_skipped.dtype == jnp.int32
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  _assert_close(case, out, ref_out, "kernel vs reference")
  _assert_close(case, out, oracle_out, "kernel vs float64 oracle")
  np.testing.assert_array_equal(np.asarray(pv_skipped), np.asarray(ref_skipped))
  np.testing.assert_array_equal(np.asarray(pv_skipped), oracle_skipped)
  assert int(pv_skipped.sum()) > 0, "every case is built so that λ skips some tiles"
  # Empty rows (no kept block) are exactly zero.
  empty_rows = ~mask.any(axis=-1)  # [batch, heads, n_q_blocks]
  for b, h, i in zip(*np.nonzero(empty_rows)):
    rows = slice(i * case.block_q, (i + 1) * case.block_q)
    assert np.all(np.asarray(out[b, rows, h], np.float32) == 0.0)


def test_lambda_skips_some_blocks_and_never_with_minus_inf():
  """The cases above must actually exercise the skip: some tiles skipped, none at λ = -inf."""
  case = CASES["mha_causal_square"]
  q, k, v = _peaky_qkv(case)
  mask = _oracles.causal_valid_blocks(case.q_len, case.kv_len, case.causal, case.block_q,
                                      case.block_k)[None, None].repeat(case.heads, axis=1)
  _, never = _run_kernel(case, q, k, v, mask, jnp.full((case.heads,), -jnp.inf))
  _, eager = _run_kernel(case, q, k, v, mask, jnp.full((case.heads,), -0.5))
  assert int(never.sum()) == 0
  # The first block of each row always runs, so at most (count - 1) skips per row.
  assert 0 < int(eager.sum()) <= int(mask.sum() - mask.any(-1).sum())


def test_skip_counts_are_nested_in_lambda():
  """With λ <= 0 a skipped tile cannot raise the max, so raising λ only adds skips."""
  case = CASES["gqa4_2_ragged_noncausal"]
  q, k, v = _peaky_qkv(case)
  mask = _random_mask(case)
  counts = []
  for lam in (-8.0, -3.0, -1.0, -0.1, 0.0):
    _, skipped = _run_kernel(case, q, k, v, mask, jnp.full((case.heads,), lam, jnp.float32))
    counts.append(np.asarray(skipped))
  for looser, stricter in zip(counts, counts[1:]):
    assert np.all(looser <= stricter)
  assert counts[-1].sum() > counts[0].sum()


def test_dense_mask_without_skip_is_plain_attention():
  """Every causal-valid block kept and λ = -inf: ordinary (causal) softmax attention."""
  case = Case(q_len=40, kv_len=40, heads=2, kv_heads=1, causal=True, block_q=8, block_k=16, seed=7)
  q, k, v = _oracles.random_qkv(case.seed, q_len=case.q_len, kv_len=case.kv_len, heads=case.heads,
                                kv_heads=case.kv_heads, head_dim=case.head_dim)
  valid = _oracles.causal_valid_blocks(case.q_len, case.kv_len, True, case.block_q, case.block_k)
  mask = np.broadcast_to(valid, (1, case.heads) + valid.shape)
  out, skipped = _run_kernel(case, q, k, v, mask, jnp.full((case.heads,), -jnp.inf))
  expected = _oracles.dense_attention(q, k, v, causal=True)
  _assert_close(case, out, expected, "kernel vs dense attention")
  assert int(skipped.sum()) == 0


def test_empty_mask_gives_zeros():
  case = Case(q_len=24, kv_len=24, heads=2, kv_heads=2, causal=False, block_q=8, block_k=8)
  q, k, v = _peaky_qkv(case)
  mask = np.zeros((1, case.heads, case.n_q_blocks, case.n_k_blocks), bool)
  out, skipped = _run_kernel(case, q, k, v, mask, _lambdas(case.heads))
  assert np.all(np.asarray(out) == 0.0)
  assert np.all(np.asarray(skipped) == 0)


def test_traced_counts_use_full_grid_and_agree():
  """Under jit the counts are traced, so the grid keeps every key block; results must not change."""
  case = Case(q_len=32, kv_len=64, heads=2, kv_heads=1, causal=False, block_q=16, block_k=8,
              keep_fraction=0.3, seed=8)
  q, k, v = _peaky_qkv(case)
  mask = _random_mask(case)
  lam = _lambdas(case.heads)
  indices, counts = mask_to_kv_indices(jnp.asarray(mask))
  assert int(counts.max()) < case.n_k_blocks  # the concrete call really runs on a shrunk grid
  kwargs = dict(causal=case.causal, block_q=case.block_q, block_k=case.block_k,
                sm_scale=1.0 / math.sqrt(case.head_dim))
  eager_out, eager_skipped = block_sparse_attention_mosaic(q, k, v, indices, counts, lam, **kwargs)
  jitted = jax.jit(lambda *args: block_sparse_attention_mosaic(*args, **kwargs))
  traced_out, traced_skipped = jitted(q, k, v, indices, counts, lam)
  np.testing.assert_allclose(np.asarray(traced_out), np.asarray(eager_out), atol=F32_ABS_TOL)
  np.testing.assert_array_equal(np.asarray(traced_skipped), np.asarray(eager_skipped))


def test_batch_split_for_smem_gives_the_same_result(monkeypatch):
  """Index lists too large for SMEM are served by one kernel call per batch chunk; results must not change."""
  case = CASES["mqa_causal_more_queries_batch2"]
  q, k, v = _peaky_qkv(case)
  mask = _random_mask(case)
  lam = _lambdas(case.heads)
  whole = _run_kernel(case, q, k, v, mask, lam)
  calls = []
  call_kernel = block_sparse_mosaic._call_kernel

  def counting_call_kernel(*args, **kwargs):
    calls.append(args[0].shape[0])  # batch elements in this call
    return call_kernel(*args, **kwargs)

  monkeypatch.setattr(block_sparse_mosaic, "_call_kernel", counting_call_kernel)
  monkeypatch.setattr(block_sparse_mosaic, "_smem_budget_bytes", lambda compiling_for_tpu: 64)
  split = _run_kernel(case, q, k, v, mask, lam)
  assert calls == [1] * case.batch  # one kernel call per batch element
  np.testing.assert_array_equal(np.asarray(split[0]), np.asarray(whole[0]))
  np.testing.assert_array_equal(np.asarray(split[1]), np.asarray(whole[1]))


def test_batch_chunk_respects_smem_budget():
  # 2 heads x 4 q blocks x (3 + 1) words x 4 bytes = 128 bytes per batch element.
  assert block_sparse_mosaic._batch_chunk(8, 2, 4, 3, 1024, compiling_for_tpu=True) == 8
  assert block_sparse_mosaic._batch_chunk(8, 2, 4, 3, 300, compiling_for_tpu=True) == 2
  assert block_sparse_mosaic._batch_chunk(8, 2, 4, 3, 100, compiling_for_tpu=False) == 1
  with pytest.raises(ValueError, match="do not fit in SMEM"):
    block_sparse_mosaic._batch_chunk(8, 2, 4, 3, 60, compiling_for_tpu=True)


def test_grid_width_shrinks_to_fullest_row():
  counts = jnp.asarray([[[0, 3, 1]]], jnp.int32)
  assert block_sparse_mosaic._grid_width(counts, 5) == 3
  assert block_sparse_mosaic._grid_width(jnp.zeros((1, 1, 2), jnp.int32), 5) == 1
  assert jax.jit(lambda c: jnp.asarray(block_sparse_mosaic._grid_width(c, 5)))(counts) == 5


def _valid_args(case: Case):
  q, k, v = _peaky_qkv(case)
  indices, counts = mask_to_kv_indices(jnp.asarray(_random_mask(case)))
  return dict(q=q, k=k, v=v, kv_indices=indices, kv_counts=counts, lam=_lambdas(case.heads),
              causal=case.causal, block_q=case.block_q, block_k=case.block_k, sm_scale=0.25)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "k": a["k"][:, :, :1]}, "k and v"),
    (lambda a: {**a, "q": a["q"][:, :, :3]}, "heads=3"),
    (lambda a: {**a, "v": a["v"].astype(jnp.bfloat16)}, "dtype"),
    (lambda a: {**a, "kv_indices": a["kv_indices"][..., :-1]}, "kv_indices"),
    (lambda a: {**a, "kv_counts": a["kv_counts"][:, :1]}, "kv_counts"),
    (lambda a: {**a, "lam": a["lam"][:1]}, "lam"),
    (lambda a: {**a, "block_q": 0}, "block_q"),
    (lambda a: {**a, "sm_scale": math.inf}, "sm_scale"),
])
def test_bad_input_raises_clear_error(change, message):
  args = change(_valid_args(Case(q_len=16, kv_len=16, heads=4, kv_heads=2, causal=True)))
  with pytest.raises(ValueError, match=message):
    block_sparse_attention_mosaic(**args)


@pytest.mark.parametrize("block_q, block_k, message", [(12, 128, "block_q=12"), (16, 64, "block_k=64")])
def test_tpu_block_minimums_are_enforced(monkeypatch, block_q, block_k, message):
  """On a TPU (simulated here) Mosaic needs sublane/lane-aligned tiles; say so before lowering."""
  monkeypatch.setattr(block_sparse_mosaic, "_on_tpu", lambda: True)
  case = Case(q_len=256, kv_len=256, heads=1, kv_heads=1, causal=True, block_q=block_q, block_k=block_k)
  with pytest.raises(ValueError, match=message):
    block_sparse_attention_mosaic(**_valid_args(case))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_lowers_to_mosaic_for_tpu(monkeypatch, dtype):
  """Lowering for a TPU (no TPU needed) checks block shapes and that every op has a Mosaic rule.

  Mosaic's own layout passes run only inside the TPU compiler, so this is as far as CPU can check.
  """
  monkeypatch.setattr(block_sparse_mosaic, "_on_tpu", lambda: True)
  case = Case(q_len=200, kv_len=300, heads=4, kv_heads=2, causal=True, block_q=64, block_k=128,
              head_dim=128, dtype=dtype)
  args = _valid_args(case)
  arrays = [args.pop(name) for name in ("q", "k", "v", "kv_indices", "kv_counts", "lam")]
  kernel = jax.jit(lambda *arrays: block_sparse_attention_mosaic(*arrays, **args))
  exported = export.export(kernel, platforms=["tpu"])(*arrays)
  assert "tpu_custom_call" in exported.mlir_module()
  expected_shapes = [arrays[0].shape, (case.batch, case.heads, case.n_q_blocks)]
  assert [aval.shape for aval in exported.out_avals] == expected_shapes
