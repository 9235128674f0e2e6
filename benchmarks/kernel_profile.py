"""Nsight Compute profile of our block-sparse kernels beside cuDNN's dense attention, as a table.

    python -m benchmarks.kernel_profile                          # on a GPU with `ncu` on the PATH
    python -m benchmarks.kernel_profile --markdown_only          # the table again from the JSON

Each target (`--targets`) runs in its own process under `ncu --set full`, which profiles every kernel the
process launches (a few small XLA kernels besides the attention); the target's kernel is the longest one.
A target is "cudnn" (dense causal attention, `jax.nn.dot_product_attention(implementation="cudnn")`) or
"<backend>:<block_q>x<block_k>:<density>" with backend "mosaic_gpu" or "triton": our kernel on a random
block mask of that density with the diagonal kept (`kernel_bench.random_mask`; density 1 keeps every
causal-valid block, the dense mode). Inputs: causal bf16, batch 1, `--heads` heads, head_dim
`--head_dim`, T = S = `--seq_len`, as in `benchmarks.kernel_bench`. The report keeps the metrics that say
what bounds a kernel: duration, SM and memory throughput (% of peak), tensor-pipe activity, achieved
occupancy, registers and shared memory, the L2 hit rate, and the warp-stall reasons (cycles per issued
instruction), and writes results/kernel_profile.json and .md. ncu replays each kernel with caches
flushed, so its durations are a little above `kernel_bench`'s back-to-back timings.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from absl import flags
import numpy as np

from benchmarks import cli

FLAGS = cli.module_flags()
_TARGETS = flags.DEFINE_list(
    "targets", ["cudnn", "mosaic_gpu:128x128:1.0", "mosaic_gpu:128x128:0.15", "mosaic_gpu:64x128:0.15"],
    "What to profile: 'cudnn' or '<mosaic_gpu|triton>:<block_q>x<block_k>:<density>'.", flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32768, "T = S.", flag_values=FLAGS)
_HEADS = flags.DEFINE_integer("heads", 32, "Query (= kv) heads.", flag_values=FLAGS)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.", flag_values=FLAGS)
_NCU = flags.DEFINE_string("ncu", "ncu", "The Nsight Compute command line.", flag_values=FLAGS)
_RUN_TARGET = flags.DEFINE_string("run_target", None, "Internal: launch this target once (the profiled "
                                  "process).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "results/kernel_profile.json", "Where the JSON goes (.md beside it).",
                           flag_values=FLAGS)
_CSV_DIR = flags.DEFINE_string("csv_dir", None, "Also keep each target's raw ncu page (CSV) here.",
                                flag_values=FLAGS)
_FROM_CSV_DIR = flags.DEFINE_string(
    "from_csv_dir", None, "Re-summarise the raw pages a run kept with --csv_dir (no GPU): the targets of "
    "--out's JSON, its environment kept.", flag_values=FLAGS)
_MARKDOWN_ONLY = flags.DEFINE_bool("markdown_only", False, "Only regenerate the .md from --out.",
                                   flag_values=FLAGS)

# (label, ncu raw metric) of the table's rows: the raw page's metric names are stable across ncu versions.
TABLE_ROWS = (
    ("SM throughput %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("memory throughput %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM throughput %", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2 hit rate %", "lts__t_sector_hit_rate.pct"),
    ("achieved occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("issue active %", "sm__issue_active.avg.pct_of_peak_sustained_elapsed"),
    ("registers / thread", "launch__registers_per_thread"),
    ("dynamic smem / block (KB)", "launch__shared_mem_per_block_dynamic"),
    ("threads / block", "launch__block_size"),
    ("blocks", "launch__grid_size"),
    ("waves per SM", "launch__waves_per_multiprocessor"),
)
_DURATION = "gpu__time_duration.sum"
_TENSOR = re.compile(r"^sm__(pipe_tensor_op_(gmma|hmma)_cycles_active|inst_executed_pipe_tensor_op_(gmma|hmma))"
                     r"\.avg\.pct_of_peak_sustained_active$")
_STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
# Only these kernels are profiled (`ncu -k`): cuDNN's attention, our Mosaic GPU kernel (Mosaic GPU names
# the device function after its host function, "<name>_mosaic_gpu") and our Pallas Triton kernel.
KERNEL_FILTER = "regex:cudnn|mosaic_gpu|block_sparse_attention"
_UNIT_SCALE_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                  "s": 1e6, "second": 1e6}


# ---------------------------------------------------------------------------------------------------
# The profiled process: one target, launched twice (compilation, then the call ncu sees last)
# ---------------------------------------------------------------------------------------------------

def parse_target(target: str) -> dict[str, Any]:
  """'cudnn' or '<backend>:<bq>x<bk>:<density>' -> its fields; a clear error for anything else."""
  if target == "cudnn":
    return dict(backend="cudnn", block_q=None, block_k=None, density=1.0)
  match = re.fullmatch(r"(mosaic_gpu|triton):(\d+)x(\d+):([0-9.]+)", target)
  if not match or not 0 < float(match.group(4)) <= 1:
    raise ValueError(f"--targets entry {target!r}: expected 'cudnn' or '<mosaic_gpu|triton>:<block_q>x"
                     "<block_k>:<density>' with 0 < density <= 1, e.g. 'mosaic_gpu:128x128:0.15'")
  return dict(backend=match.group(1), block_q=int(match.group(2)), block_k=int(match.group(3)),
              density=float(match.group(4)))


def run_target(target: str) -> None:
  """Builds the target's inputs on the host (no extra kernels) and launches its attention twice."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import kernel_bench  # pylint: disable=g-import-not-at-top
  from kernels.block_index import mask_to_kv_indices  # pylint: disable=g-import-not-at-top

  spec = parse_target(target)
  seq_len, heads, head_dim = _SEQ_LEN.value, _HEADS.value, _HEAD_DIM.value
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, seq_len, heads, head_dim), np.float32), jnp.bfloat16)
             for _ in range(3))
  if spec["backend"] == "cudnn":
    for _ in range(2):
      jax.block_until_ready(kernel_bench.cudnn_dense(q, k, v))
    return
  block_q, block_k = spec["block_q"], spec["block_k"]
  valid, full = kernel_bench.block_geometry(seq_len, block_q, block_k)
  if spec["density"] >= 1.0:
    mask = np.broadcast_to(valid, (1, heads) + valid.shape)
  else:
    mask = kernel_bench.random_mask(seq_len + block_q, spec["density"], heads, valid, full)
  indices, counts = jax.block_until_ready(mask_to_kv_indices(jnp.asarray(mask)))
  build = kernel_bench.ours_mosaic_gpu if spec["backend"] == "mosaic_gpu" else kernel_bench.ours
  kernel = build(block_q, block_k, head_dim)
  no_skip = jnp.full((heads,), -jnp.inf)
  for _ in range(2):
    jax.block_until_ready(kernel(q, k, v, indices, counts, no_skip))
  print(f"density {mask.sum() / (heads * valid.sum()):.4f}, "
        f"cta_loads_per_kept {kernel_bench.cta_loads_per_kept(mask, block_q):.3f}")


# ---------------------------------------------------------------------------------------------------
# The driver: ncu per target, then the report
# ---------------------------------------------------------------------------------------------------

def _csv_rows(text: str) -> list[list[str]]:
  """The CSV records of ncu's output (its '==PROF==' and the program's own lines dropped)."""
  return list(csv.reader(io.StringIO("\n".join(line for line in text.splitlines() if line.startswith('"')))))


def _number(value: str) -> float:
  try:
    return float(value.replace(",", ""))
  except ValueError:
    return math.nan


def parse_raw(text: str) -> list[dict[str, Any]]:
  """ncu `--page raw --csv` (a header row, a units row, one row per kernel launch) -> per launch its
  "name", "duration_us" and {metric: value} of every metric (NaN where not a number); a shared-memory
  size is in the units of ncu's units row (KB in ncu 2025)."""
  rows = _csv_rows(text)
  if len(rows) < 3:
    return []
  header, units = rows[0], rows[1]
  name_column, duration_column = header.index("Kernel Name"), header.index(_DURATION)
  launches = []
  for row in rows[2:]:
    if len(row) != len(header):
      continue
    metrics = {metric: _number(value) for metric, value in zip(header, row)}
    duration = metrics[_DURATION] * _UNIT_SCALE_US.get(units[duration_column], math.nan)
    launches.append(dict(name=row[name_column], duration_us=duration, metrics=metrics))
  return launches


def summarise(launches: list[dict[str, Any]]) -> dict[str, Any]:
  """The longest launch of one target's process: its name, duration, table metrics, tensor-pipe activity
  and warp-stall reasons (largest first)."""
  if not launches:
    raise RuntimeError("ncu reported no kernels (is the GPU's performance-counter access enabled?)")
  launch = max(launches, key=lambda entry: -1.0 if math.isnan(entry["duration_us"]) else entry["duration_us"])
  metrics = launch["metrics"]
  table = {label: metrics.get(metric, math.nan) for label, metric in TABLE_ROWS}
  stalls = {_STALL.match(name).group(1): value for name, value in metrics.items()
            if _STALL.match(name) and not math.isnan(value)}
  tensor = {name: value for name, value in metrics.items() if _TENSOR.match(name) and not math.isnan(value)}
  return dict(kernel=launch["name"], duration_us=launch["duration_us"], metrics=table, tensor_pipe=tensor,
              stalls=dict(sorted(stalls.items(), key=lambda item: -item[1])), launches=len(launches))


def _file_stem(target: str) -> str:
  return re.sub(r"[^\w.]", "_", target)


def profile(target: str, workdir: str) -> dict[str, Any]:
  """Runs one target under ncu and summarises its longest kernel."""
  report = os.path.join(workdir, _file_stem(target))
  command = [*_NCU.value.split(), "--set", "full", "-k", KERNEL_FILTER, "--target-processes", "all", "-f",
             "-o", report,
             sys.executable, "-m", "benchmarks.kernel_profile", f"--run_target={target}",
             f"--seq_len={_SEQ_LEN.value}", f"--heads={_HEADS.value}", f"--head_dim={_HEAD_DIM.value}"]
  # XLA's autotuning would launch (and ncu would profile) many candidate kernels: none of them is ours.
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())
  launched = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  print(launched.stdout[-2000:], launched.stderr[-2000:], sep="\n")
  if launched.returncode != 0:
    raise RuntimeError(f"ncu on {target} exited {launched.returncode}: {launched.stderr[-500:]}")

  raw = subprocess.run([*_NCU.value.split(), "-i", report + ".ncu-rep", "--page", "raw", "--csv"],
                       capture_output=True, text=True, check=True).stdout
  if _CSV_DIR.value:  # the whole raw page, for metrics the table leaves out
    os.makedirs(_CSV_DIR.value, exist_ok=True)
    cli.write_atomically(os.path.join(_CSV_DIR.value, os.path.basename(report) + ".raw.csv"), raw)
  summary = summarise(parse_raw(raw))
  summary.update(target=target, **parse_target(target))
  summary["program_output"] = [line for line in launched.stdout.splitlines() if line.startswith("density")]
  return summary


def resummarise(entry: dict[str, Any], csv_dir: str) -> dict[str, Any]:
  """`entry` (one profile of a results JSON) summarised again from its kept raw page."""
  with open(os.path.join(csv_dir, _file_stem(entry["target"]) + ".raw.csv"), encoding="utf-8") as file:
    summary = summarise(parse_raw(file.read()))
  return {**entry, **summary}


def _value(value: float | None) -> str:
  if value is None or math.isnan(value):
    return "-"
  return f"{value:.1f}" if value != int(value) else f"{int(value)}"


def markdown(results: dict[str, Any]) -> str:
  """The report: one column per target, the table metrics, tensor pipe and the top stall reasons."""
  env, profiles = results["environment"], results["profiles"]
  lines = ["# Kernel profile (Nsight Compute, `--set full`)", "",
           f"GPU: {env.get('gpu')}; jax {env.get('jax')}; ncu {env.get('ncu', '?')}. Causal bf16, batch 1, "
           f"{results['heads']} heads, head_dim {results['head_dim']}, T = S = {results['seq_len']}; random "
           "block masks with the diagonal kept. Generated by `python -m benchmarks.kernel_profile`; ncu "
           "replays each kernel with caches flushed and clocks locked, so durations exceed back-to-back "
           "timings.", "",
           "| metric | " + " | ".join(p["target"] for p in profiles) + " |",
           "|---|" + "---|" * len(profiles)]
  lines.append("| kernel | " + " | ".join(f"`{p['kernel'][:40]}`" for p in profiles) + " |")
  lines.append("| duration µs | " + " | ".join(_value(p["duration_us"]) for p in profiles) + " |")
  cudnn = next((p for p in profiles if p["target"] == "cudnn"), None)
  if cudnn is not None:  # the kernel_bench targets' ratios, from the profiled durations
    lines.append("| vs cuDNN | " + " | ".join(f"{p['duration_us'] / cudnn['duration_us']:.2f}"
                                                for p in profiles) + " |")
    lines.append("| vs density · cuDNN | " + " | ".join(
        f"{p['duration_us'] / (p['density'] * cudnn['duration_us']):.2f}" for p in profiles) + " |")
  for label, _ in TABLE_ROWS:
    lines.append(f"| {label} | " + " | ".join(_value(p["metrics"].get(label)) for p in profiles) + " |")
  for name in sorted({name for p in profiles for name in p["tensor_pipe"]}):
    lines.append(f"| `{name.split('.')[0]}` % | " + " | ".join(_value(p["tensor_pipe"].get(name))
                                                               for p in profiles) + " |")
  reasons = sorted({r for p in profiles for r in list(p["stalls"])[:5]})
  for reason in reasons:
    lines.append(f"| stall `{reason}` (warps per issue) | "
                 + " | ".join(f"{p['stalls'][reason]:.2f}" if reason in p["stalls"] else "-"
                              for p in profiles) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  if _RUN_TARGET.value:
    run_target(_RUN_TARGET.value)
    return
  if _MARKDOWN_ONLY.value or _FROM_CSV_DIR.value:
    with open(_OUT.value, encoding="utf-8") as file:
      results = json.load(file)
    if _FROM_CSV_DIR.value:
      results["profiles"] = [resummarise(entry, _FROM_CSV_DIR.value) for entry in results["profiles"]]
    print(cli.write_results(results, _OUT.value, markdown))
    return
  for target in _TARGETS.value:
    parse_target(target)  # every entry checked before the first (slow) profile
  if shutil.which(_NCU.value.split()[0]) is None:
    raise SystemExit(f"--ncu={_NCU.value!r} is not on the PATH: this benchmark needs Nsight Compute")
  from benchmarks import kernel_bench  # pylint: disable=g-import-not-at-top
  env = kernel_bench.environment()
  version = subprocess.run([*_NCU.value.split(), "--version"], capture_output=True, text=True, check=False)
  env["ncu"] = (version.stdout.strip().splitlines() or ["?"])[-1]
  profiles = []
  with tempfile.TemporaryDirectory() as workdir:
    for target in _TARGETS.value:
      try:
        profiles.append(profile(target, workdir))
      except Exception as error:  # pylint: disable=broad-except
        print(f"{target}: {error}", file=sys.stderr)
      results = dict(environment=env, seq_len=_SEQ_LEN.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                     profiles=profiles)
      if profiles:
        print(cli.write_results(results, _OUT.value, markdown))  # after every target: a time limit keeps some


if __name__ == "__main__":
  cli.run(main, FLAGS)
