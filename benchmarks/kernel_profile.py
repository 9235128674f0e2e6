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
_MARKDOWN_ONLY = flags.DEFINE_bool("markdown_only", False, "Only regenerate the .md from --out.",
                                   flag_values=FLAGS)

# (label, ncu "details" metric name) of the table's rows; ncu names vary a little between versions, so a
# row lists alternatives.
DETAIL_ROWS = (
    ("duration", ("Duration",)),
    ("SM throughput %", ("Compute (SM) Throughput",)),
    ("memory throughput %", ("Memory Throughput",)),
    ("DRAM throughput %", ("DRAM Throughput",)),
    ("L2 hit rate %", ("L2 Hit Rate",)),
    ("achieved occupancy %", ("Achieved Occupancy",)),
    ("registers / thread", ("Registers Per Thread",)),
    ("dynamic smem / block", ("Dynamic Shared Memory Per Block",)),
    ("block size", ("Block Size",)),
    ("grid size", ("Grid Size",)),
    ("waves per SM", ("Waves Per SM",)),
    ("warp cycles / issued inst", ("Warp Cycles Per Issued Instruction",)),
    ("issued IPC", ("Issued Ipc Active", "Issue Slots Busy")),
)
# Raw metrics kept besides the details page: tensor-pipe activity and the warp-stall breakdown.
RAW_PATTERNS = (
    re.compile(r"^sm__pipe_tensor_op_(gmma|hmma)_cycles_active\.avg\.pct_of_peak_sustained_active$"),
    re.compile(r"^sm__inst_executed_pipe_tensor_op_(gmma|hmma)\.avg\.pct_of_peak_sustained_active$"),
    re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$"),
)
_STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


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


def parse_details(text: str) -> dict[str, dict[str, Any]]:
  """ncu `--page details --csv` -> {kernel ID: {"name", "metrics": {metric: (value, unit)}}}."""
  rows = _csv_rows(text)
  if not rows:
    return {}
  header, kernels = rows[0], {}
  column = {name: header.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Unit",
                                                  "Metric Value")}
  for row in rows[1:]:
    if len(row) != len(header):
      continue
    entry = kernels.setdefault(row[column["ID"]], dict(name=row[column["Kernel Name"]], metrics={}))
    entry["metrics"][row[column["Metric Name"]]] = (_number(row[column["Metric Value"]]),
                                                    row[column["Metric Unit"]])
  return kernels


def parse_raw(text: str) -> dict[str, dict[str, float]]:
  """ncu `--page raw --csv` (a header row, a units row, one row per kernel) -> {kernel ID: {metric: value}}
  for the metrics of RAW_PATTERNS."""
  rows = _csv_rows(text)
  if len(rows) < 3:
    return {}
  header = rows[0]
  keep = [i for i, name in enumerate(header) if any(p.match(name) for p in RAW_PATTERNS)]
  return {row[header.index("ID")]: {header[i]: _number(row[i]) for i in keep}
          for row in rows[2:] if len(row) == len(header)}


def _duration_us(metrics: dict[str, tuple[float, str]]) -> float:
  value, unit = metrics.get("Duration", (math.nan, ""))
  scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
  return value * scale.get(unit, math.nan)


def summarise(details: dict[str, dict[str, Any]], raw: dict[str, dict[str, float]]) -> dict[str, Any]:
  """The longest kernel of one target's process: its name, duration, table metrics and stall reasons."""
  if not details:
    raise RuntimeError("ncu reported no kernels (is the GPU's performance-counter access enabled?)")
  kernel_id = max(details, key=lambda i: _duration_us(details[i]["metrics"]))
  metrics = details[kernel_id]["metrics"]
  table = {}
  for label, names in DETAIL_ROWS:
    found = next((name for name in names if name in metrics), None)
    table[label] = None if found is None else dict(value=metrics[found][0], unit=metrics[found][1])
  kernel_raw = raw.get(kernel_id, {})
  stalls = {_STALL.match(name).group(1): value for name, value in kernel_raw.items() if _STALL.match(name)}
  tensor = {name: value for name, value in kernel_raw.items() if not _STALL.match(name)}
  return dict(kernel=details[kernel_id]["name"], duration_us=_duration_us(metrics), metrics=table,
              tensor_pipe=tensor, stalls=dict(sorted(stalls.items(), key=lambda item: -item[1])),
              kernels_in_process=len(details))


def profile(target: str, workdir: str) -> dict[str, Any]:
  """Runs one target under ncu and summarises its longest kernel."""
  report = os.path.join(workdir, re.sub(r"[^\w.]", "_", target))
  command = [*_NCU.value.split(), "--set", "full", "--target-processes", "all", "-f", "-o", report,
             sys.executable, "-m", "benchmarks.kernel_profile", f"--run_target={target}",
             f"--seq_len={_SEQ_LEN.value}", f"--heads={_HEADS.value}", f"--head_dim={_HEAD_DIM.value}"]
  # XLA's autotuning would launch (and ncu would profile) many candidate kernels: none of them is ours.
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip())
  launched = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  print(launched.stdout[-2000:], launched.stderr[-2000:], sep="\n")
  if launched.returncode != 0:
    raise RuntimeError(f"ncu on {target} exited {launched.returncode}: {launched.stderr[-500:]}")

  def page(name: str) -> str:
    return subprocess.run([*_NCU.value.split(), "-i", report + ".ncu-rep", "--page", name, "--csv"],
                          capture_output=True, text=True, check=True).stdout

  summary = summarise(parse_details(page("details")), parse_raw(page("raw")))
  summary.update(target=target, **parse_target(target))
  summary["program_output"] = [line for line in launched.stdout.splitlines() if line.startswith("density")]
  return summary


def _value(entry: dict[str, Any] | None) -> str:
  if entry is None or entry["value"] is None or math.isnan(entry["value"]):
    return "-"
  value = entry["value"]
  return f"{value:.1f}" if value != int(value) else f"{int(value)}"


def markdown(results: dict[str, Any]) -> str:
  """The report: one column per target, the table metrics, tensor pipe and the top stall reasons."""
  env, profiles = results["environment"], results["profiles"]
  lines = ["# Kernel profile (Nsight Compute, `--set full`)", "",
           f"GPU: {env.get('gpu')}; jax {env.get('jax')}; ncu {env.get('ncu', '?')}. Causal bf16, batch 1, "
           f"{results['heads']} heads, head_dim {results['head_dim']}, T = S = {results['seq_len']}; random "
           "block masks with the diagonal kept. Generated by `python -m benchmarks.kernel_profile`.", "",
           "| metric | " + " | ".join(p["target"] for p in profiles) + " |",
           "|---|" + "---|" * len(profiles)]
  lines.append("| kernel | " + " | ".join(f"`{p['kernel'][:40]}`" for p in profiles) + " |")
  lines.append("| duration µs | " + " | ".join(f"{p['duration_us']:.0f}" for p in profiles) + " |")
  for label, _ in DETAIL_ROWS[1:]:
    lines.append(f"| {label} | " + " | ".join(_value(p["metrics"].get(label)) for p in profiles) + " |")
  tensor_names = sorted({name for p in profiles for name in p["tensor_pipe"]})
  for name in tensor_names:
    lines.append(f"| `{name.split('.')[0]}` % | "
                 + " | ".join(f"{p['tensor_pipe'][name]:.1f}" if name in p["tensor_pipe"] else "-"
                              for p in profiles) + " |")
  reasons = sorted({r for p in profiles for r in list(p["stalls"])[:5]})
  for reason in reasons:
    lines.append(f"| stall `{reason}` (cycles/inst) | "
                 + " | ".join(f"{p['stalls'][reason]:.2f}" if reason in p["stalls"] else "-"
                              for p in profiles) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  if _RUN_TARGET.value:
    run_target(_RUN_TARGET.value)
    return
  if _MARKDOWN_ONLY.value:
    import json  # pylint: disable=g-import-not-at-top
    with open(_OUT.value, encoding="utf-8") as file:
      print(cli.write_results(json.load(file), _OUT.value, markdown))
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
