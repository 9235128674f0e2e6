"""Tuner benchmark: AFBS-BO vs SpargeAttn's grid autotune vs a plain s-grid on SmolLM2-135M activations.

    python -m benchmarks.tuner_bench                                           # GPU: low 2048 / high 8192
    python -m benchmarks.tuner_bench --layers=2 --low_len=256 --high_len=512   # CPU smoke check

Run from the repository root. Captures each layer's post-RoPE Q/K/V from the dense forward of the
embedded GGUF (or `--gguf_path`) on State of the Union text (calibration input + validation inputs from
disjoint text), builds one SpargeAttn `LayerEvaluator` per layer and runs every chosen tuner of
`afbs_jax.tuner.registry.TUNERS` on that SAME evaluator: same activations, same cached dense outputs,
same compiled kernels (compiled and cached before any tuner is timed). For each tuner it reports
evaluate calls, kernel launches, head-evaluations, wall time, mean sparsity, worst validation error and
the fraction of heads inside the band, then AFBS-BO's ratios against the SpargeAttn grid. Writes
`results/tuner_bench.json` (device kind, library versions, settings, per-layer numbers) and
`results/tuner_bench.md`, which is generated from the JSON (`--render=results/tuner_bench.json` redoes
only that step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from afbs_jax import calibration, checkpoint, data, report
from afbs_jax.attention import LatentMap, SpargeMethod
from afbs_jax.model import default_gguf_path, iter_layer_qkv, load_gguf
from afbs_jax.tuner import AFBSConfig
from afbs_jax.tuner import model_tuning
from afbs_jax.tuner.config import ACQUISITIONS
from afbs_jax.tuner.evaluator import LayerEvaluator
from benchmarks import cli
from kernels import block_config

TUNERS = tuple(model_tuning.TUNERS)
# What the paper reports for AFBS-BO against grid search (launches = evaluations; wall time).
TARGET_LAUNCH_RATIO = 8.8
TARGET_WALL_RATIO = 3.4

# Its own FlagValues: other benchmarks define the same names (`benchmarks.cli`).
FLAGS = cli.module_flags()
_GGUF_PATH = flags.DEFINE_string("gguf_path", None, "SmolLM2 GGUF file (default: the embedded one).", flag_values=FLAGS)
_DATASET = flags.DEFINE_string("dataset", "sotu", "Calibration corpus (sotu, wikitext2, text:PATH).", flag_values=FLAGS)
_LOW_LEN = flags.DEFINE_integer("low_len", 2048, "Low-fidelity length (prefix of the calibration input).", flag_values=FLAGS)
_HIGH_LEN = flags.DEFINE_integer("high_len", 8192, "High-fidelity length (calibration/validation inputs).", flag_values=FLAGS)
_LAYERS = flags.DEFINE_integer("layers", 0, "Tune only the first N layers (0 = all).", flag_values=FLAGS)
_NUM_VALIDATION = flags.DEFINE_integer("num_validation", 5, "Validation inputs (stage 3).", flag_values=FLAGS)
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 64, "block_q = block_k (a power of two >= "
                                   f"{block_config.MIN_BLOCK}).", flag_values=FLAGS)
_SINK = flags.DEFINE_bool("attention_sink", True, "Always keep key block 0 (SpargeAttn's tuned path).", flag_values=FLAGS)
_EPS_LOW = flags.DEFINE_float("eps_low", 0.045, "Lower edge of the error band.", flag_values=FLAGS)
_EPS_HIGH = flags.DEFINE_float("eps_high", 0.055, "Upper edge of the error band.", flag_values=FLAGS)
_ACQUISITION = flags.DEFINE_enum("acquisition", "band", ACQUISITIONS, "AFBS-BO acquisition.", flag_values=FLAGS)
_BACKEND = flags.DEFINE_enum("backend", "auto", block_config.backend_names(),
                             "Kernel backend (auto picks per platform).", flag_values=FLAGS)
_TUNERS = flags.DEFINE_list("tuners", list(TUNERS), f"Tuners to run, from {TUNERS}.", flag_values=FLAGS)
_TAU_MIN = flags.DEFINE_float("tau_min", None, "Latent map: τ at s = 1 (default: LatentMap's).", flag_values=FLAGS)
_THETA_MIN = flags.DEFINE_float("theta_min", None, "Latent map: θ at s = 1 (default: LatentMap's).", flag_values=FLAGS)
_LAM_MAX = flags.DEFINE_float("lam_max", None, "Latent map: λ at s = 1 (default: LatentMap's).", flag_values=FLAGS)
_RENDER = flags.DEFINE_string("render", None, "Only regenerate the Markdown report from this results JSON.", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", os.path.join("results", "tuner_bench.json"), "Results JSON path.", flag_values=FLAGS)


@dataclasses.dataclass
class TunerTotals:
  """One tuner's numbers summed over layers, and its per-head outcome."""

  calls: int = 0
  launches: int = 0
  head_evaluations: int = 0
  tokens: int = 0
  wall_time_s: float = 0.0
  sparsity: list[np.ndarray] = dataclasses.field(default_factory=list)
  error: list[np.ndarray] = dataclasses.field(default_factory=list)
  layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def summary(self, eps_low: float, eps_high: float) -> dict[str, Any]:
    sparsity, error = np.stack(self.sparsity), np.stack(self.error)
    return {
        "evaluate_calls": self.calls, "kernel_launches": self.launches,
        "head_evaluations": self.head_evaluations, "tokens": self.tokens, "wall_time_s": self.wall_time_s,
        **report.overall_stats(sparsity, error, eps_low=eps_low, eps_high=eps_high,
                               layers_done=sparsity.shape[0]),
        "sparsity": sparsity, "error": error, "layers": self.layers,
    }


def tune_layer_with_all(evaluator: LayerEvaluator, afbs_config: AFBSConfig, tuners: Sequence[str],
                        warm_start: np.ndarray | None, totals: Mapping[str, TunerTotals], layer: int):
  """Runs each tuner on the same (warmed-up) evaluator; returns AFBS-BO's s for the next warm start."""
  evaluator.warm_up()
  next_warm_start = None
  for tuner in tuners:
    evaluator.reset_counters()
    start = time.perf_counter()
    # run_tuner hands the warm start only to tuners that use one (AFBS-BO).
    result = model_tuning.run_tuner(evaluator, afbs_config, tuner=tuner, warm_start=warm_start)
    seconds = time.perf_counter() - start
    counters = evaluator.totals()
    total = totals[tuner]
    total.calls += int(result.num_calls)
    total.launches += int(counters["launches"])
    total.head_evaluations += int(counters["head_evaluations"])
    total.tokens += int(counters["tokens"])
    total.wall_time_s += seconds
    total.sparsity.append(np.asarray(result.sparsity, np.float32))
    total.error.append(np.asarray(result.error, np.float32))
    total.layers.append({"layer": layer, "calls": int(result.num_calls), "launches": int(counters["launches"]),
                         "wall_time_s": seconds, "mean_sparsity": float(np.mean(result.sparsity)),
                         "worst_error": float(np.max(result.error)), **result.params, "s": result.s})
    if tuner == "afbs":
      next_warm_start = np.asarray(result.s, np.float32)
  return next_warm_start


def ratios(summaries: Mapping[str, Mapping[str, Any]], baseline: str) -> dict[str, float] | None:
  """AFBS-BO against `baseline`: launch and wall-time ratios (baseline / AFBS) and sparsity difference."""
  if "afbs" not in summaries or baseline not in summaries:
    return None
  afbs, other = summaries["afbs"], summaries[baseline]
  return {
      "launch_ratio": other["kernel_launches"] / max(afbs["kernel_launches"], 1),
      "call_ratio": other["evaluate_calls"] / max(afbs["evaluate_calls"], 1),
      "wall_time_ratio": other["wall_time_s"] / max(afbs["wall_time_s"], 1e-12),
      "mean_sparsity_difference": afbs["mean_sparsity"] - other["mean_sparsity"],
  }


def render_markdown(results: Mapping[str, Any]) -> str:
  """The Markdown report, generated from the results JSON."""
  settings = results["settings"]
  lines = [
      "# Tuner benchmark: AFBS-BO vs grid search",
      "",
      f"Device: {results['device']} ({results['platform']}), jax {results['versions'].get('jax')}. "
      f"Model {results['model']} ({results['gguf_file']}), {settings['layers']} layers × "
      f"{settings['num_heads']} heads, fidelities "
      f"{settings['low_len']}/{settings['high_len']} tokens, {settings['num_validation']} validation inputs, "
      f"block {settings['block_size']}, band [{settings['eps_low']}, {settings['eps_high']}]. "
      f"Generated by `python -m benchmarks.tuner_bench {results['command_flags']}`.",
      "",
      "| tuner | evaluate calls | kernel launches | head-evaluations | wall time (s) | mean sparsity | "
      "mean sparsity of heads ≤ ε_high | worst val. error | heads ≤ ε_high | heads in band |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for tuner, summary in results["tuners"].items():
    lines.append(
        f"| {tuner} | {summary['evaluate_calls']} | {summary['kernel_launches']} | "
        f"{summary['head_evaluations']} | {summary['wall_time_s']:.2f} | {summary['mean_sparsity']:.3f} | "
        f"{_mean_sparsity_within(summary, settings['eps_high']):.3f} | {summary['worst_error']:.4f} | "
        f"{100 * summary['within_eps_high']:.1f}% | {100 * summary['in_band']:.1f}% |")
  for baseline, ratio in results["ratios"].items():
    if ratio is None:
      continue
    target = (f" (targets {TARGET_LAUNCH_RATIO}× and {TARGET_WALL_RATIO}×)" if baseline == "spargeattn_grid"
              else "")
    lines += ["", f"AFBS-BO vs {baseline}{target}: {ratio['launch_ratio']:.2f}× fewer launches, "
              f"{ratio['wall_time_ratio']:.2f}× less wall time, mean sparsity difference "
              f"{ratio['mean_sparsity_difference']:+.3f} (AFBS-BO − {baseline})."]
  targets = results.get("targets")
  if targets:
    lines += ["", "Targets met: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in targets.items())
              + "."]
  return "\n".join(lines) + "\n"


def _mean_sparsity_within(summary: Mapping[str, Any], eps_high: float) -> float:
  """Mean sparsity over the heads whose worst validation error is <= ε_high (0 when there are none)."""
  sparsity, error = np.asarray(summary["sparsity"], np.float64), np.asarray(summary["error"], np.float64)
  within = error <= eps_high
  return float(sparsity[within].mean()) if within.any() else 0.0


def write_markdown(results: Mapping[str, Any], json_path: str) -> str:
  """Writes the Markdown report beside `json_path` (same name, .md) and returns its path."""
  markdown_path = os.path.splitext(json_path)[0] + ".md"
  with open(markdown_path, "w", encoding="utf-8") as f:
    f.write(render_markdown(results))
  return markdown_path


def _targets(summaries: Mapping[str, Any], grid_ratio: Mapping[str, float] | None) -> dict[str, bool] | None:
  if grid_ratio is None:
    return None
  return {
      f"launches >= {TARGET_LAUNCH_RATIO}x": grid_ratio["launch_ratio"] >= TARGET_LAUNCH_RATIO,
      f"wall time >= {TARGET_WALL_RATIO}x": grid_ratio["wall_time_ratio"] >= TARGET_WALL_RATIO,
      "mean sparsity >= grid": grid_ratio["mean_sparsity_difference"] >= 0.0,
      "every AFBS-BO head <= eps_high": summaries["afbs"]["within_eps_high"] == 1.0,
  }


def main(argv: list[str]) -> None:
  del argv
  if _RENDER.value:  # Regenerate the Markdown of an earlier run from its JSON.
    with open(_RENDER.value, encoding="utf-8") as f:
      print(f"wrote {write_markdown(json.load(f), _RENDER.value)}")
    return
  tuners = list(_TUNERS.value)
  unknown = sorted(set(tuners) - set(TUNERS))
  if unknown:
    raise app.UsageError(f"--tuners has unknown names {unknown}; allowed: {TUNERS}")
  if not 1 <= _LOW_LEN.value <= _HIGH_LEN.value:
    raise app.UsageError(f"need 1 <= --low_len <= --high_len; got {_LOW_LEN.value}, {_HIGH_LEN.value}")
  try:
    blocks = block_config.BlockSparseConfig.square(_BLOCK_SIZE.value, backend=_BACKEND.value)
  except block_config.BlockConfigError as e:
    raise app.UsageError(f"--block_size: {e}") from None
  method = SpargeMethod(attention_sink=_SINK.value)
  model, tokenizer = load_gguf(_GGUF_PATH.value)
  corpus = data.load_corpus(_DATASET.value)
  tokens = calibration.calibration_tokens(tokenizer, corpus.train, num_inputs=1 + _NUM_VALIDATION.value,
                                          length=_HIGH_LEN.value)
  bounds = {"tau_min": _TAU_MIN.value, "theta_min": _THETA_MIN.value, "lam_max": _LAM_MAX.value}
  latent = LatentMap(**{name: value for name, value in bounds.items() if value is not None})
  afbs_config = AFBSConfig(eps_low=_EPS_LOW.value, eps_high=_EPS_HIGH.value, acquisition=_ACQUISITION.value,
                           num_validation=_NUM_VALIDATION.value, latent=latent)
  num_layers = _LAYERS.value or model.config.num_layers
  totals = {tuner: TunerTotals() for tuner in tuners}
  warm_start, capture_seconds, start = None, 0.0, time.perf_counter()
  capture_start = time.perf_counter()
  for layer, q, k, v in iter_layer_qkv(model, tokens):
    if layer >= num_layers:
      break
    q, k, v = jax.block_until_ready((q, k, v))
    capture_seconds += time.perf_counter() - capture_start
    evaluator = LayerEvaluator(q, k, v, low_len=_LOW_LEN.value, method=method, blocks=blocks,
                               latent=afbs_config.latent)
    warm_start = tune_layer_with_all(evaluator, afbs_config, tuners, warm_start, totals, layer)
    line = " | ".join(f"{t}: {totals[t].layers[-1]['calls']} calls {totals[t].layers[-1]['wall_time_s']:.2f}s "
                      f"sp {totals[t].layers[-1]['mean_sparsity']:.3f}" for t in tuners)
    print(f"layer {layer}: {line}", flush=True)
    del evaluator, q, k, v
    capture_start = time.perf_counter()
  summaries = {tuner: totals[tuner].summary(_EPS_LOW.value, _EPS_HIGH.value) for tuner in tuners}
  all_ratios = {baseline: ratios(summaries, baseline) for baseline in ("spargeattn_grid", "s_grid")}
  results = {
      "benchmark": "tuner_bench",
      "device": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "versions": checkpoint.library_versions(),
      "model": model.config.name,
      # Paths are left out: they name one machine's files, not the experiment.
      "command_flags": " ".join(a for a in sys.argv[1:] if not a.startswith(("--gguf_path", "--output"))),
      "gguf_file": os.path.basename(_GGUF_PATH.value or default_gguf_path()),
      "settings": {"layers": num_layers, "num_heads": model.config.num_heads, "low_len": _LOW_LEN.value,
                   "high_len": _HIGH_LEN.value, "num_validation": _NUM_VALIDATION.value,
                   "block_size": _BLOCK_SIZE.value, "attention_sink": _SINK.value,
                   "eps_low": _EPS_LOW.value, "eps_high": _EPS_HIGH.value,
                   "acquisition": _ACQUISITION.value, "backend": _BACKEND.value, "dataset": _DATASET.value,
                   "latent": dataclasses.asdict(afbs_config.latent)},
      "capture_time_s": capture_seconds,
      "total_time_s": time.perf_counter() - start,
      "tuners": summaries,
      "ratios": all_ratios,
      "targets": _targets(summaries, all_ratios["spargeattn_grid"]),
  }
  report.write_json(_OUTPUT.value, results)
  markdown_path = write_markdown(report.to_jsonable(results), _OUTPUT.value)
  print(render_markdown(report.to_jsonable(results)))
  print(f"wrote {_OUTPUT.value} and {markdown_path}")


if __name__ == "__main__":
  cli.run(main, FLAGS)
