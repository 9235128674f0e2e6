"""On-GPU check of the Mosaic GPU (Hopper) block-sparse kernel: correctness per case class, then timing.

The CPU suite (`tests/kernels/test_block_sparse_mosaic_gpu.py`) can only interpret or lower the kernel;
this runs the compiled kernel through the front door (`backend="mosaic_gpu"`) against the f32 jnp
reference, over the case classes of the CPU suites: causal and not, GQA and MHA, ragged lengths with
T < S and T > S, empty rows, the λ skip (served by the Triton kernel, checked all the same), block
densities 1.0 / 0.5 / 0.15, block shapes 64×128 and 128×128 (and 128×64), bf16 and f16, head_dim 64 and
128, a NaN in K. Every case runs in its own try/except and is reported PASS / FAIL / ERROR with its max
errors. Then a timing table: causal bf16, batch 1, 32 heads, head_dim 128, every block kept (and density
0.5), cuDNN dense vs our Triton and Mosaic GPU backends, ratios side by side. Run from the repository root
(each part well under 10 minutes on an H200):

  python -m benchmarks.mosaic_gpu_check --out=results/mosaic_gpu_check.json
  python -m benchmarks.mosaic_gpu_check --skip_timing --out=results/mosaic_gpu_check.json   # check only
"""

from __future__ import annotations

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import statistics
import time
import traceback
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cli
from kernels import block_sparse_mosaic_gpu as mgpu
from kernels.block_config import BlockSparseConfig
from kernels.block_index import causal_block_mask
from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse_reference import block_sparse_attention_reference
# pylint: enable=g-import-not-at-top,wrong-import-position

# Its own FlagValues: other benchmarks define the same names (`benchmarks.cli`).
FLAGS = cli.module_flags()
_OUT = flags.DEFINE_string("out", "results/mosaic_gpu_check.json", "Where the JSON goes.", flag_values=FLAGS)
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "32768"], "T = S values of the timing.", flag_values=FLAGS)
_HEADS = flags.DEFINE_integer("heads", 32, "Heads of the timing.", flag_values=FLAGS)
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions (median reported).", flag_values=FLAGS)
_SKIP_CHECK = flags.DEFINE_bool("skip_check", False, "Only time.", flag_values=FLAGS)
_SKIP_TIMING = flags.DEFINE_bool("skip_timing", False, "Only check.", flag_values=FLAGS)
_BACKEND = flags.DEFINE_string("backend", "mosaic_gpu", "Backend the checks run (triton: a control run).", flag_values=FLAGS)
_CASES = flags.DEFINE_string("cases", "", "Only the check cases whose name contains this (e.g. lambda).", flag_values=FLAGS)

TOLERANCE = {"bfloat16": 2e-2, "float16": 4e-3}   # max |out - ref| / max |ref|


# ----------------------------------------------------------------------------------------------------
# Correctness.


def _case_classes() -> list[dict[str, Any]]:
  """Every case: shapes, mask density, λ, dtype, blocks; named by what it covers."""
  cases = []
  for blocks in ((64, 128), (128, 128)):
    for dtype in ("bfloat16", "float16"):
      for causal in (True, False):
        for density in (1.0, 0.5, 0.15):
          cases.append(dict(name="base", q_len=1000, kv_len=1000, heads=8, kv_heads=2, head_dim=128,
                            blocks=blocks, dtype=dtype, causal=causal, density=density, lam=None))
  for blocks in ((64, 128), (128, 128), (128, 64)):
    common = dict(heads=4, head_dim=128, blocks=blocks, dtype="bfloat16", density=0.5, lam=None)
    cases += [
        dict(common, name="mha_T<S", q_len=700, kv_len=1100, kv_heads=4, causal=True),
        dict(common, name="gqa_T>S", q_len=1100, kv_len=700, kv_heads=1, causal=True),
        dict(common, name="head_dim64", q_len=512, kv_len=512, kv_heads=2, causal=True, head_dim=64),
        dict(common, name="lambda_skip", q_len=1024, kv_len=1024, kv_heads=2, causal=True, density=1.0,
             lam=(-0.5, -2.0, -np.inf, -4.0), sink=4.0),
        dict(common, name="lambda_skip_full", q_len=900, kv_len=900, kv_heads=2, causal=False,
             lam=(-1.0, -np.inf, -0.25, -3.0), sink=4.0),
        dict(common, name="nan_in_k", q_len=512, kv_len=512, kv_heads=2, causal=True, density=1.0,
             nan_key=300),
    ]
  return cases


def _inputs(case: dict[str, Any], seed: int):
  rng = np.random.default_rng(seed)
  batch, q_len, kv_len = 2 if case["name"] == "base" else 1, case["q_len"], case["kv_len"]
  q = rng.standard_normal((batch, q_len, case["heads"], case["head_dim"]))
  k = rng.standard_normal((batch, kv_len, case["kv_heads"], case["head_dim"]))
  v = rng.standard_normal((batch, kv_len, case["kv_heads"], case["head_dim"]))
  if case.get("sink"):
    q[..., 0] += case["sink"]
    k[:, :8, :, 0] += case["sink"]
  if case.get("nan_key") is not None:
    k[0, case["nan_key"], 0, 0] = np.nan
  block_q, block_k = case["blocks"]
  valid = causal_block_mask(q_len, kv_len, causal=case["causal"], block_q=block_q, block_k=block_k)
  mask = (rng.random((batch, case["heads"]) + valid.shape) < case["density"]) & valid
  mask[0, 0, 0] = False                                     # an empty row
  mask[0, 1, :] = False                                     # a whole empty head
  dtype = jnp.dtype(case["dtype"])
  return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(mask))


def check_case(case: dict[str, Any], seed: int) -> dict[str, Any]:
  row = {key: (list(value) if isinstance(value, tuple) else value) for key, value in case.items()}
  row["lam"] = None if case["lam"] is None else [float(x) for x in case["lam"]]
  try:
    q, k, v, mask = _inputs(case, seed)
    block_q, block_k = case["blocks"]
    lam = None if case["lam"] is None else jnp.asarray(case["lam"], jnp.float32)
    out, stats = block_sparse_attention(q, k, v, mask, lam=lam, causal=case["causal"], block_q=block_q,
                                        block_k=block_k, backend=_BACKEND.value, return_stats=True)
    ref, ref_skipped = block_sparse_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k, v)), mask & causal_block_mask(
            case["q_len"], case["kv_len"], causal=case["causal"], block_q=block_q, block_k=block_k),
        lam, causal=case["causal"], block_q=block_q, block_k=block_k,
        sm_scale=1.0 / math.sqrt(case["head_dim"]))
    out, ref = np.asarray(out.astype(jnp.float32)), np.asarray(ref)
    same_nan = bool((np.isnan(out) == np.isnan(ref)).all())
    finite = ~np.isnan(ref)
    max_abs = float(np.max(np.abs(out[finite] - ref[finite]))) if finite.any() else 0.0
    rel = max_abs / max(float(np.max(np.abs(ref[finite]))) if finite.any() else 0.0, 1e-30)
    empty_rows_zero = bool((out[0, :block_q, 0] == 0).all() and (out[0, :, 1] == 0).all())
    kept = np.asarray(mask & causal_block_mask(case["q_len"], case["kv_len"], causal=case["causal"],
                                               block_q=block_q, block_k=block_k)).sum(axis=(2, 3))
    skipped_ok = bool(np.allclose(np.asarray(stats.pv_skipped) * np.maximum(kept, 1),
                                  np.asarray(ref_skipped).sum(axis=2), atol=1e-3))
    ok = rel <= TOLERANCE[case["dtype"]] and same_nan and empty_rows_zero and skipped_ok
    row.update(status="PASS" if ok else "FAIL", max_abs_err=max_abs, rel_err=rel, nan_pattern_ok=same_nan,
               empty_rows_zero=empty_rows_zero, pv_skipped_ok=skipped_ok,
               pv_skipped=float(np.asarray(stats.pv_skipped).mean()),
               backend=_BACKEND.value)
  except Exception as error:  # pylint: disable=broad-except
    row.update(status="ERROR", error=f"{type(error).__name__}: {error}"[:2000],
               traceback=traceback.format_exc()[-4000:])
  return row


def run_checks() -> list[dict[str, Any]]:
  rows = []
  for seed, case in enumerate(_case_classes()):
    if _CASES.value not in case["name"]:
      continue
    start = time.perf_counter()
    row = check_case(case, seed)
    row["seconds"] = time.perf_counter() - start
    rows.append(row)
    detail = (f"rel {row['rel_err']:.2e} abs {row['max_abs_err']:.2e}" if "rel_err" in row
              else row.get("error", "")[:300])
    print(f"{row['status']:5} {case['name']:16} T={case['q_len']:<5} S={case['kv_len']:<5} "
          f"H={case['heads']}/{case['kv_heads']} d={case['head_dim']} blocks={case['blocks']} "
          f"{case['dtype']:8} causal={case['causal']!s:5} density={case['density']} lam={case['lam']}: "
          f"{detail}", flush=True)
  return rows


# ----------------------------------------------------------------------------------------------------
# Timing.


def time_jax(fn: Callable[..., Any], *args) -> float:
  """Median milliseconds of fn(*args) over --reps calls (after two warm-up calls)."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def run_timing() -> list[dict[str, Any]]:
  rows = []
  heads, head_dim = _HEADS.value, 128
  for seq_len in (int(x) for x in _SEQ_LENS.value):
    keys = jax.random.split(jax.random.key(seq_len), 3)
    q, k, v = (jax.random.normal(key, (1, seq_len, heads, head_dim), jnp.bfloat16) for key in keys)
    try:
      cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                   implementation="cudnn"))
      cudnn_ms = time_jax(cudnn, q, k, v)
    except Exception as error:  # pylint: disable=broad-except
      cudnn_ms = math.nan
      print(f"T={seq_len}: cudnn failed: {error}")
    rows.append(dict(seq_len=seq_len, variant="cudnn_dense", blocks="-", density=1.0, ms=cudnn_ms,
                     vs_cudnn=1.0))
    print(f"T={seq_len}: cudnn dense {cudnn_ms:.3f} ms", flush=True)
    for block_q, block_k in ((64, 128), (128, 128)):
      valid = causal_block_mask(seq_len, seq_len, causal=True, block_q=block_q, block_k=block_k)
      for density in (1.0, 0.5):
        rng = np.random.default_rng(0)
        mask = (rng.random((1, heads) + valid.shape) < density) & valid
        last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)         # each row's diagonal block
        mask[..., np.arange(valid.shape[0]), last] = True
        mask = jnp.asarray(mask)
        for backend in ("triton", "mosaic_gpu"):
          config = BlockSparseConfig(block_q=block_q, block_k=block_k, causal=True, backend=backend)
          fn = jax.jit(lambda q, k, v, mask, config=config: block_sparse_attention(
              q, k, v, mask, causal=True, block_q=config.block_q, block_k=config.block_k,
              backend=config.backend))
          row = dict(seq_len=seq_len, variant=backend, blocks=f"{block_q}x{block_k}", density=density)
          try:
            ms = time_jax(fn, q, k, v, mask)
            row.update(ms=ms, vs_cudnn=ms / cudnn_ms, vs_density_cudnn=ms / (density * cudnn_ms))
            print(f"T={seq_len}: {backend:10} {block_q}x{block_k} density {density}: {ms:.3f} ms = "
                  f"{ms / cudnn_ms:.2f}x cuDNN dense", flush=True)
          except Exception as error:  # pylint: disable=broad-except
            row.update(ms=math.nan, error=f"{type(error).__name__}: {error}"[:2000])
            print(f"T={seq_len}: {backend} {block_q}x{block_k} density {density}: ERROR {error}"[:400],
                  flush=True)
          rows.append(row)
  # Side by side: Triton and Mosaic GPU ratios per (T, blocks, density).
  print("\nT      blocks   density  triton/cudnn  mosaic_gpu/cudnn")
  for seq_len in sorted({r["seq_len"] for r in rows}):
    for blocks in ("64x128", "128x128"):
      for density in (1.0, 0.5):
        ratio = {r["variant"]: r.get("vs_cudnn", math.nan) for r in rows
                 if r["seq_len"] == seq_len and r["blocks"] == blocks and r["density"] == density}
        print(f"{seq_len:<6} {blocks:8} {density:<8} {ratio.get('triton', math.nan):<13.3f} "
              f"{ratio.get('mosaic_gpu', math.nan):.3f}")
  return rows


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(jax=jax.__version__, device=device.device_kind, platform=device.platform,
              compute_capability=getattr(device, "compute_capability", None),
              mosaic_gpu_reason=mgpu.platform_reason(causal=True),
              auto_backend=BlockSparseConfig(64, 128).for_platform(
                  jax.default_backend(), head_dim=128, dtype=jnp.bfloat16)[0].backend)


def main(argv):
  del argv
  results: dict[str, Any] = dict(environment=environment())
  print(json.dumps(results["environment"]), flush=True)

  def write():
    cli.write_atomically(_OUT.value, json.dumps(results, indent=1, default=str))

  if not _SKIP_CHECK.value:
    results["checks"] = run_checks()
    counts = {s: sum(r["status"] == s for r in results["checks"]) for s in ("PASS", "FAIL", "ERROR")}
    results["check_summary"] = counts
    print(f"\nchecks: {counts}", flush=True)
    write()
  if not _SKIP_TIMING.value:
    results["timing"] = run_timing()
    write()
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main, FLAGS)
