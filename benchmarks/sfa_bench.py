"""Times the Sparse Feature Attention kernels against dense cuDNN and our dense Pallas kernel on one GPU.

For causal bf16 attention (batch 1, `--heads` 16) at each (sequence length, head_dim) of
`--seq_lens` × `--head_dims` (8K / 32K × 64 / 128) it times, forward only:

  * dense cuDNN: `jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`; where cuDNN
    refuses the shape, `implementation=None` (XLA) stands in and the row records which ran and why;
  * our dense Pallas kernel: `kernel_bench.ours`, the Triton block-sparse kernel with every causal block
    kept (kernel_bench's "ours all-kept"), at the SFA kernels' tiles `--blocks`;
  * SFA (`kernels.sfa.sfa_attention`, k_q = k_k = k) for each k of `--ks` below head_dim, in both kernel
    forms: `triton` (dense tiles: top-k zeroing, then the block-sparse kernel) and `triton_codes`
    ((index, value) codes decoded per tile).

`--backward` adds the time of `jax.grad` of sum(out) in q, k, v (forward + backward) for every contender.
Times are the median of `--reps` after compilation and warm-up (`kernel_bench.time_jax`, one call per
repetition for a contender slower than 20 ms a call). Before timing, each contender's output is checked
against the f32 jnp reference `kernels.sfa_reference.sfa_attention_reference` (k = head_dim for the dense ones) on the
first `--check_len` query rows: under causal masking they depend on the first `--check_len` keys only, so
the reference runs on that prefix while the kernel output checked is the full-length one that is timed.
The max abs error goes into the JSON. Ratios: `vs cuDNN` = SFA / dense cuDNN, `vs Pallas` = SFA / our
dense Pallas (< 1: SFA is faster); "where it pays" lists the rows below 1, computed from the data. Each
row also carries the paper's theoretical cost: QK^T in Θ(n²k²/d) instead of Θ(n²d), a fraction (k/d)²
of the dense logits, and (1 + (k/d)²)/2 of the whole forward (P·V stays dense). Neither kernel form
realises it yet: both compute dense-tile logits (`kernels.sfa_codes` says why), so the table shows what
the present kernels cost. Run from the repository root:

  python -m benchmarks.sfa_bench                               # 8K, 32K × d 64, 128 × k 8, 16, 32 (~1-2 min)
  python -m benchmarks.sfa_bench --backward --out=results/sfa_bench_backward.json
  python -m benchmarks.sfa_bench --quick --out=/tmp/sfa_quick.json     # CPU smoke run, interpret mode

Writes results/sfa_bench.json and results/sfa_bench.md (generated from the JSON, naming the device, jax
version and date); `--markdown_only` regenerates the .md from an existing JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import cli
from benchmarks import kernel_bench
from kernels.block_index import causal_block_mask, mask_to_kv_indices
from kernels.block_sparse import block_sparse_attention
from kernels.sfa import SFA_BACKENDS, sfa_attention
from kernels.sfa_reference import sfa_attention_reference

# Its own FlagValues: other benchmarks and the CLI define the same names (`benchmarks.cli`).
FLAGS = cli.module_flags()
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "32768"], "T = S values.", flag_values=FLAGS)
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dimensions.", flag_values=FLAGS)
_KS = flags.DEFINE_list("ks", ["8", "16", "32"], "Features kept per query and per key (k_q = k_k = k); "
                        "k >= head_dim is skipped.", flag_values=FLAGS)
_HEADS = flags.DEFINE_integer("heads", 16, "Query (= kv) heads.", flag_values=FLAGS)
_BACKENDS = flags.DEFINE_list("backends", ["triton", "triton_codes"], "SFA backends timed "
                              f"(of {', '.join(SFA_BACKENDS)}).", flag_values=FLAGS)
_BLOCKS = flags.DEFINE_string("blocks", "64x64", "block_q x block_k of the SFA and dense Pallas kernels.",
                              flag_values=FLAGS)
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).", flag_values=FLAGS)
_CHECK = flags.DEFINE_bool("check", True, "Check every contender against the f32 reference before timing.",
                           flag_values=FLAGS)
_CHECK_LEN = flags.DEFINE_integer("check_len", 1024, "Query rows (and keys) the check compares.",
                                  flag_values=FLAGS)
_BACKWARD = flags.DEFINE_bool("backward", False, "Also time jax.grad of sum(out) in q, k, v.",
                              flag_values=FLAGS)
_QUICK = flags.DEFINE_bool("quick", False, "CPU smoke run: interpret backends, T 256, d 32, k 8, 2 heads, f32.",
                           flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "results/sfa_bench.json", "Where the JSON goes (.md beside it).",
                           flag_values=FLAGS)
_MARKDOWN_ONLY = flags.DEFINE_bool("markdown_only", False, "Only regenerate the .md from --out.",
                                   flag_values=FLAGS)

CUDNN, PALLAS, SFA = "cudnn_dense", "pallas_dense", "sfa"


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run: the shapes, the contenders and how they are timed and checked.

  Attributes:
    seq_lens, head_dims, ks: the grid (k >= head_dim skipped).
    heads: query (= kv) heads; batch is 1.
    dtype: of q, k, v ("bfloat16" on the GPU).
    sfa_backends: `kernels.sfa.SFA_BACKENDS` names timed for each k.
    dense_implementation: `jax.nn.dot_product_attention`'s implementation tried first ("cudnn" or None);
      None (XLA) stands in when it fails.
    pallas_backend: the block-sparse backend of the dense Pallas row ("triton" or "interpret"), or None
      to skip it (recorded).
    block_q, block_k: tiles of the SFA and dense Pallas kernels.
    reps: timed repetitions (median).
    check, check_len: the reference check and the prefix it compares.
    backward: also time jax.grad of sum(out).
    warm_up_s: seconds of large matmuls before timing (GPU clocks), 0 for none.
  """

  seq_lens: tuple[int, ...] = (8192, 32768)
  head_dims: tuple[int, ...] = (64, 128)
  ks: tuple[int, ...] = (8, 16, 32)
  heads: int = 16
  dtype: str = "bfloat16"
  sfa_backends: tuple[str, ...] = ("triton", "triton_codes")
  dense_implementation: str | None = "cudnn"
  pallas_backend: str | None = "triton"
  block_q: int = 64
  block_k: int = 64
  reps: int = 5
  check: bool = True
  check_len: int = 1024
  backward: bool = False
  warm_up_s: float = 3.0


def quick_settings() -> Settings:
  """A CPU run in seconds: the interpret backends at T 256, d 32, k 8, 2 heads, f32, one repetition."""
  return Settings(seq_lens=(256,), head_dims=(32,), ks=(8,), heads=2, dtype="float32",
                  sfa_backends=("interpret", "interpret_codes"), dense_implementation=None,
                  pallas_backend="interpret", reps=1, check_len=256, warm_up_s=0.0)


# ----------------------------------------------------------------------------------------------------
# Timing.

# One call per repetition for a contender whose warm-up call takes longer than this (interpret mode, the
# codes kernel at 32K), so slow contenders do not dominate the run (`kernel_bench.time_jax`).
_SLOW_MS = 20.0


def grad_of_sum(attention: Callable[..., jax.Array]) -> Callable[..., Any]:
  """Jitted (q, k, v) -> (dq, dk, dv) of sum(attention(q, k, v)) in f32: forward plus backward."""
  return jax.jit(jax.grad(lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))


# ----------------------------------------------------------------------------------------------------
# The contenders: each (q, k, v) -> out [1, T, heads, head_dim], differentiable for --backward.


def dense_attention(implementation: str | None) -> Callable[..., jax.Array]:
  """Causal `jax.nn.dot_product_attention` with the given implementation ("cudnn", or None: XLA)."""
  return jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=implementation))


def pallas_dense_forward(settings: Settings, seq_len: int, heads: int, head_dim: int) -> Callable[..., jax.Array]:
  """kernel_bench's "ours all-kept": the Triton block-sparse kernel over every causal block, λ = -inf."""
  valid = causal_block_mask(seq_len, seq_len, causal=True, block_q=settings.block_q, block_k=settings.block_k)
  indices, counts = mask_to_kv_indices(jnp.broadcast_to(jnp.asarray(valid), (1, heads) + valid.shape))
  no_skip = jnp.full((heads,), -jnp.inf, jnp.float32)
  kernel = kernel_bench.ours(settings.block_q, settings.block_k, head_dim,
                             interpret=settings.pallas_backend == "interpret")
  return lambda q, k, v: kernel(q, k, v, indices, counts, no_skip)[0]


def pallas_dense_differentiable(settings: Settings, seq_len: int, heads: int) -> Callable[..., jax.Array]:
  """The same kernel through the block-sparse front door (its custom_vjp: the Pallas backward)."""
  valid = causal_block_mask(seq_len, seq_len, causal=True, block_q=settings.block_q, block_k=settings.block_k)
  mask = jnp.broadcast_to(jnp.asarray(valid), (1, heads) + valid.shape)
  return lambda q, k, v: block_sparse_attention(q, k, v, mask, causal=True, block_q=settings.block_q,
                                                block_k=settings.block_k, backend=settings.pallas_backend)


def sfa(settings: Settings, backend: str, k_features: int) -> Callable[..., jax.Array]:
  """Causal `sfa_attention` with k_q = k_k = k_features on `backend`."""
  return functools.partial(sfa_attention, k_q=k_features, k_k=k_features, causal=True, backend=backend,
                           block_q=settings.block_q, block_k=settings.block_k)


# ----------------------------------------------------------------------------------------------------
# Check and one (T, d) configuration.


def max_abs_error(out: jax.Array, reference: jax.Array) -> float:
  """max |out[:, :P] - reference| in f32; reference: [1, P, heads, head_dim] for the first P rows."""
  prefix = reference.shape[1]
  return float(jnp.max(jnp.abs(out[:, :prefix].astype(jnp.float32) - reference)))


def _error_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def flops_fractions(k_features: int, head_dim: int) -> dict[str, float]:
  """The paper's theoretical cost of SFA relative to dense: QK^T alone, and QK^T + P·V (forward)."""
  qk = (k_features / head_dim) ** 2
  return dict(qk_flops_fraction=qk, attention_flops_fraction=(1.0 + qk) / 2)


def bench_config(settings: Settings, seq_len: int, head_dim: int) -> list[dict[str, Any]]:
  """Every contender at one (T, head_dim); one row per contender (SFA: per backend and k).

  Rows: variant (CUDNN, PALLAS or SFA), backend, k (None for the dense ones), ms, optional bwd_ms,
  check_max_abs_error, and for SFA the FLOPs fractions and vs_cudnn / vs_pallas (bwd_vs_* with --backward).
  A contender that fails records ms NaN and a note.
  """
  heads, reps = settings.heads, settings.reps
  q, k, v = (x.astype(settings.dtype) for x in kernel_bench.random_qkv(seq_len + head_dim, seq_len, heads,
                                                                         head_dim))
  prefix = min(settings.check_len, seq_len)
  references: dict[int, jax.Array] = {}

  def reference(k_features: int) -> jax.Array:
    if k_features not in references:
      references[k_features] = sfa_attention_reference(
          *(x[:, :prefix].astype(jnp.float32) for x in (q, k, v)), k_q=k_features, k_k=k_features, causal=True)
    return references[k_features]

  def measure(row: dict[str, Any], forward: Callable[..., jax.Array],
              differentiable: Callable[..., jax.Array] | None, k_features: int) -> dict[str, Any]:
    try:
      if settings.check:
        row["check_max_abs_error"] = max_abs_error(forward(q, k, v), reference(k_features))
      row["ms"] = kernel_bench.time_jax(forward, q, k, v, reps=reps, slow_ms=_SLOW_MS)
      if settings.backward and differentiable is not None:
        row["bwd_ms"] = kernel_bench.time_jax(grad_of_sum(differentiable), q, k, v, reps=reps, slow_ms=_SLOW_MS)
    except Exception as error:  # pylint: disable=broad-except
      row.update(ms=row.get("ms", math.nan), note=_error_line(error))
      print(f"  {row['variant']} {row['backend']} k={row['k']} failed: {row['note']}", flush=True)
    return row

  base = dict(seq_len=seq_len, head_dim=head_dim)
  rows = []
  # Dense cuDNN, XLA standing in if cuDNN refuses.
  implementation = settings.dense_implementation
  cudnn_row = measure(dict(base, variant=CUDNN, backend=implementation or "xla", k=None),
                      dense_attention(implementation), dense_attention(implementation), head_dim)
  if implementation is not None and not math.isfinite(cudnn_row["ms"]):
    fallback = measure(dict(base, variant=CUDNN, backend="xla", k=None), dense_attention(None),
                       dense_attention(None), head_dim)
    fallback["note"] = f"{implementation} failed ({cudnn_row['note']}); XLA stands in" + (
        f"; {fallback['note']}" if "note" in fallback else "")
    cudnn_row = fallback
  rows.append(cudnn_row)
  # Our dense Pallas kernel, every block kept.
  if settings.pallas_backend is None:
    rows.append(dict(base, variant=PALLAS, backend="-", k=None, ms=math.nan, note="skipped (pallas_backend None)"))
  else:
    rows.append(measure(dict(base, variant=PALLAS, backend=settings.pallas_backend, k=None),
                        jax.jit(pallas_dense_forward(settings, seq_len, heads, head_dim)),
                        pallas_dense_differentiable(settings, seq_len, heads), head_dim))
  dense = {row["variant"]: row for row in rows}
  for line in rows:
    print(f"T={seq_len} d={head_dim}: {line['variant']} ({line['backend']}) {line['ms']:.3f} ms", flush=True)
  for k_features in settings.ks:
    if k_features >= head_dim:
      continue
    for backend in settings.sfa_backends:
      fn = sfa(settings, backend, k_features)
      row = measure(dict(base, variant=SFA, backend=backend, form=SFA_BACKENDS[backend].form, k=k_features,
                         **flops_fractions(k_features, head_dim)), jax.jit(fn), fn, k_features)
      for name, key in (("cudnn", CUDNN), ("pallas", PALLAS)):
        row[f"vs_{name}"] = row["ms"] / dense[key]["ms"]
        if "bwd_ms" in row:
          row[f"bwd_vs_{name}"] = row["bwd_ms"] / dense[key].get("bwd_ms", math.nan)
      rows.append(row)
      print("  ", {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()},
            flush=True)
  return rows


# ----------------------------------------------------------------------------------------------------
# Run.


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(device_kind=device.device_kind, platform=device.platform, jax=jax.__version__,
              python=platform.python_version(),
              date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def run(settings: Settings, out: str | None = None) -> dict[str, Any]:
  """Benchmarks every (T, head_dim); writes the JSON and Markdown after each (a cut-off run keeps them)."""
  results: dict[str, Any] = dict(environment=environment(), settings=dataclasses.asdict(settings), rows=[])
  print(results["environment"], flush=True)
  if settings.warm_up_s > 0 and jax.default_backend() == "gpu":
    kernel_bench.warm_up_gpu(settings.warm_up_s)
  for seq_len in settings.seq_lens:
    for head_dim in settings.head_dims:
      results["rows"] += bench_config(settings, seq_len, head_dim)
      results["where_it_pays"] = where_it_pays(results["rows"])
      if out:
        write(results, out)
  return results


# ----------------------------------------------------------------------------------------------------
# Report.


def _label(row: dict[str, Any]) -> str:
  return f"T={row['seq_len']} d={row['head_dim']} k={row['k']} {row['backend']}"


def where_it_pays(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
  """Per ratio, the SFA rows faster than the dense baseline (< 1), not faster (>= 1), and not measured (NaN)."""
  verdicts: dict[str, list[str]] = {}
  ratios = ["vs_cudnn", "vs_pallas"] + (["bwd_vs_cudnn", "bwd_vs_pallas"]
                                        if any("bwd_vs_cudnn" in row for row in rows) else [])
  sfa_rows = [row for row in rows if row["variant"] == SFA]
  for ratio in ratios:
    values = [(row, row.get(ratio, math.nan)) for row in sfa_rows]
    verdicts[f"{ratio}_pays"] = [_label(row) for row, value in values if value < 1]
    verdicts[f"{ratio}_does_not"] = [_label(row) for row, value in values if value >= 1]
    verdicts[f"{ratio}_not_measured"] = [_label(row) for row, value in values if math.isnan(value)]
  return verdicts


def _cell(value: Any, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _error_cell(value: Any) -> str:
  return "-" if value is None else f"{value:.1e}"


def markdown(results: dict[str, Any]) -> str:
  env, settings = results["environment"], results["settings"]
  rows = results["rows"]
  backward = settings["backward"]
  baseline = {(row["seq_len"], row["head_dim"], row["variant"]): row for row in rows if row["variant"] != SFA}
  lines = [
      "# Sparse Feature Attention (SFA) kernel benchmark",
      "",
      f"Device: {env['device_kind']} ({env['platform']}); jax {env['jax']}; {env['date']}. Causal, "
      f"{settings['dtype']}, batch 1, {settings['heads']} heads, tiles {settings['block_q']}x{settings['block_k']}; "
      f"median of {settings['reps']} runs (ms), forward" + (" and jax.grad of sum(out) (fwd + bwd)" if backward
                                                            else " only") + ".",
      "Generated by `python -m benchmarks.sfa_bench` from its JSON.",
      "",
      "cuDNN = `jax.nn.dot_product_attention(implementation=\"cudnn\")` (the `backend` column says when XLA "
      "stood in); Pallas = our Triton block-sparse kernel with every causal block kept. SFA keeps k features "
      "per query and per key (k_q = k_k = k): `triton` = dense-tile form, `triton_codes` = (index, value) "
      "codes form (`interpret*`: the same kernels in Pallas interpret mode). Ratios are SFA ms / dense ms "
      "(< 1: SFA faster). `(k/d)²` = the paper's QK^T cost fraction Θ(n²k²/d) / Θ(n²d); `fwd FLOPs` = "
      "(1 + (k/d)²) / 2, the whole forward with P·V dense. Both kernel forms still compute dense-tile "
      "logits, so neither fraction is realised by these kernels. `max err` = max |out − f32 reference| on the "
      f"first {settings['check_len']} rows.",
      "",
      "## Dense baselines",
      "",
      "| T | d | contender | backend | ms |" + (" fwd+bwd ms |" if backward else "") + " max err | note |",
      "|---|---|---|---|---|" + ("---|" if backward else "") + "---|---|",
  ]
  for row in rows:
    if row["variant"] == SFA:
      continue
    lines.append("| " + " | ".join([str(row["seq_len"]), str(row["head_dim"]), row["variant"], row["backend"],
                                     _cell(row["ms"])] + ([_cell(row.get("bwd_ms"))] if backward else [])
                                    + [_error_cell(row.get("check_max_abs_error")),
                                       row.get("note", "").replace("|", "/")]) + " |")
  lines += ["", "## SFA vs dense", "",
            "| T | d | k | backend | (k/d)² | fwd FLOPs | ms | cuDNN ms | Pallas ms | vs cuDNN | vs Pallas |"
            + (" fwd+bwd ms | bwd vs cuDNN | bwd vs Pallas |" if backward else "") + " max err | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if backward else "") + "---|---|"]
  for row in rows:
    if row["variant"] != SFA:
      continue
    cudnn = baseline.get((row["seq_len"], row["head_dim"], CUDNN), {})
    pallas = baseline.get((row["seq_len"], row["head_dim"], PALLAS), {})
    cells = [str(row["seq_len"]), str(row["head_dim"]), str(row["k"]), row["backend"],
             _cell(row["qk_flops_fraction"], 4), _cell(row["attention_flops_fraction"], 3), _cell(row["ms"]),
             _cell(cudnn.get("ms")), _cell(pallas.get("ms")), _cell(row.get("vs_cudnn"), 2),
             _cell(row.get("vs_pallas"), 2)]
    if backward:
      cells += [_cell(row.get("bwd_ms")), _cell(row.get("bwd_vs_cudnn"), 2), _cell(row.get("bwd_vs_pallas"), 2)]
    cells += [_error_cell(row.get("check_max_abs_error")), row.get("note", "").replace("|", "/")]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Where it pays (ratio < 1) and where it does not", ""]
  lines += verdict_lines(results)
  return "\n".join(lines) + "\n"


def verdict_lines(results: dict[str, Any]) -> list[str]:
  """One Markdown bullet per measured ratio: where SFA is faster than the dense baseline and where not."""
  lines: list[str] = []
  names = {"vs_cudnn": "forward vs cuDNN", "vs_pallas": "forward vs our dense Pallas",
           "bwd_vs_cudnn": "fwd+bwd vs cuDNN", "bwd_vs_pallas": "fwd+bwd vs our dense Pallas"}
  verdicts = results.get("where_it_pays", {})
  for ratio, name in names.items():
    if f"{ratio}_pays" not in verdicts:
      continue
    pays, does_not = verdicts[f"{ratio}_pays"], verdicts[f"{ratio}_does_not"]
    missing = verdicts.get(f"{ratio}_not_measured", [])
    if pays and does_not:
      text = f"pays at {', '.join(pays)}; does not at {', '.join(does_not)}"
    elif pays:
      text = f"pays at all {len(pays)} measured configurations"
    else:   # a list of every configuration says less than the closest one
      measured = [row for row in results["rows"] if row["variant"] == SFA and not math.isnan(row.get(ratio, math.nan))]
      closest = min(measured, key=lambda row: row[ratio]) if measured else None
      text = f"pays at none of {len(does_not)} measured configurations" + (
          f" (closest: {_label(closest)} at {closest[ratio]:.2f})" if closest else "")
    lines.append(f"- {name}: {text}" + (f"; not measured at {', '.join(missing)}" if missing else "") + ".")
  return lines


def write(results: dict[str, Any], out: str) -> None:
  cli.write_results(results, out, markdown)


def main(argv: list[str]) -> None:
  del argv
  if _MARKDOWN_ONLY.value:
    with open(_OUT.value) as file:
      cli.write_atomically(os.path.splitext(_OUT.value)[0] + ".md", markdown(json.load(file)))
    return
  if _QUICK.value:
    settings = quick_settings()
  else:
    block_q, block_k = map(int, _BLOCKS.value.split("x"))
    settings = Settings(seq_lens=tuple(map(int, _SEQ_LENS.value)), head_dims=tuple(map(int, _HEAD_DIMS.value)),
                        ks=tuple(map(int, _KS.value)), heads=_HEADS.value, sfa_backends=tuple(_BACKENDS.value),
                        block_q=block_q, block_k=block_k, reps=_REPS.value, check=_CHECK.value,
                        check_len=_CHECK_LEN.value, backward=_BACKWARD.value)
  if _QUICK.value:
    settings = dataclasses.replace(settings, check=_CHECK.value, backward=_BACKWARD.value)
  results = run(settings, out=_OUT.value)
  print(markdown(results))


if __name__ == "__main__":
  cli.run(main, FLAGS)
