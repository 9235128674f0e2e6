"""Results of a tune/eval run: the summary table, `results.json` and the layer × head sparsity heatmap.

Everything printed or plotted is generated from one results dict (what `results.json` holds), so the
console summary, the JSON and the figure never disagree. The heatmap is drawn with matplotlib's Agg
backend, which needs no display.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESULTS_FILE = "results.json"
HEATMAP_FILE = "sparsity_heatmap.png"
CONFIG_FILE = "config.json"


def overall_stats(sparsity: np.ndarray, error: np.ndarray, *, eps_low: float, eps_high: float,
                  layers_done: int) -> dict[str, float]:
  """Whole-model numbers over the tuned layers.

  Args:
    sparsity, error: f32 [layers, heads]; only the first `layers_done` rows are used.
  """
  sparsity = np.asarray(sparsity, np.float64)[:layers_done]
  error = np.asarray(error, np.float64)[:layers_done]
  if sparsity.size == 0:
    return {"mean_sparsity": 0.0, "worst_error": 0.0, "within_eps_high": 0.0, "in_band": 0.0}
  return {
      "mean_sparsity": float(sparsity.mean()),
      "worst_error": float(error.max()),
      "within_eps_high": float(np.mean(error <= eps_high)),
      "in_band": float(np.mean((error >= eps_low) & (error <= eps_high))),
  }


def format_layer_table(layer_stats: Sequence[Mapping[str, Any]]) -> str:
  """Per-layer table: mean sparsity, worst validation error, evaluate calls, launches, seconds."""
  header = f"{'layer':>5} {'sparsity':>9} {'worst err':>10} {'in band':>8} {'evals':>6} {'launches':>9} {'time s':>8}"
  lines = [header, "-" * len(header)]
  for stats in layer_stats:
    seconds = stats["tune_time_s"] + stats.get("capture_time_s", 0.0)
    lines.append(f"{stats['layer']:>5d} {stats['mean_sparsity']:>9.3f} {stats['worst_error']:>10.4f} "
                 f"{stats['within_eps_high']:>8.2f} {stats['num_calls']:>6d} {stats['launches']:>9d} "
                 f"{seconds:>8.2f}")
  return "\n".join(lines)


def format_summary(results: Mapping[str, Any]) -> str:
  """The console summary of a run: per-layer table, overall sparsity and dense vs sparse perplexity."""
  lines = [f"model {results['model']} | dataset {results['dataset']} | tuner {results['tuner']} | "
           f"device {results['device']}"]
  tune = results.get("tune")
  if tune:
    lines.append(format_layer_table(tune["layers"]))
    overall = tune["overall"]
    band = tune["band"]
    lines.append(
        f"overall: mean sparsity {overall['mean_sparsity']:.3f} | worst validation error "
        f"{overall['worst_error']:.4f} (band [{band[0]:.3f}, {band[1]:.3f}]) | heads with error <= "
        f"eps_high {100 * overall['within_eps_high']:.1f}% | evals {tune['total_calls']} | launches "
        f"{tune['total_launches']} | tune {tune['wall_time_s']:.1f}s ({tune['layers_done']}/"
        f"{tune['num_layers']} layers, {tune['layers_resumed']} resumed)")
  decode = results.get("tune_decode")
  if decode:
    overall = decode["overall"]
    lines.append(
        f"decode: mean decode sparsity {overall['mean_sparsity']:.3f} | worst validation error "
        f"{overall['worst_error']:.4f} | heads with error <= eps_high {100 * overall['within_eps_high']:.1f}% | "
        f"evals {decode['total_calls']} | tune {decode['wall_time_s']:.1f}s ({decode['layers_done']}/"
        f"{decode['num_layers']} layers, {decode['layers_resumed']} resumed)")
  evaluation = results.get("eval")
  if evaluation and "sparse_ppl" not in evaluation:
    lines.append(
        f"dense perplexity on {evaluation['num_tokens']} held-out tokens (context {evaluation['context']}, "
        f"stride {evaluation['stride']}): {evaluation['dense_ppl']:.3f} | "
        f"{evaluation['dense_tokens_per_s']:.0f} tokens/s | eval {evaluation['wall_time_s']:.1f}s")
  elif evaluation:
    delta = evaluation["sparse_ppl"] - evaluation["dense_ppl"]
    lines.append(
        f"perplexity on {evaluation['num_tokens']} held-out tokens (context {evaluation['context']}): "
        f"dense {evaluation['dense_ppl']:.3f} | sparse {evaluation['sparse_ppl']:.3f} "
        f"({delta:+.3f}, {100 * delta / evaluation['dense_ppl']:+.2f}%) | eval {evaluation['wall_time_s']:.1f}s")
  return "\n".join(lines)


def write_json(path: str, payload: Mapping[str, Any]) -> str:
  """Writes `payload` as indented JSON (numpy values converted) via a temporary file and a rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(to_jsonable(payload), f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(temporary, path)
  return path


def to_jsonable(value: Any) -> Any:
  """Converts numpy arrays/scalars, tuples and ConfigDicts to plain JSON types; NaN/inf become None."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_jsonable(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(value)


def save_sparsity_heatmap(sparsity: np.ndarray, path: str, *, title: str) -> str:
  """Draws block sparsity as a layers × heads heatmap (rows = layers) and saves it as a PNG.

  Args:
    sparsity: f32 [layers, heads] in [0, 1].
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sparsity = np.asarray(sparsity, np.float32)
  if sparsity.ndim != 2:
    raise ValueError(f"sparsity must be [layers, heads]; got shape {sparsity.shape}")
  layers, heads = sparsity.shape
  figure, axes = plt.subplots(figsize=(max(4.0, 0.45 * heads + 2.0), max(3.0, 0.22 * layers + 1.5)))
  image = axes.imshow(sparsity, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
  axes.set_xlabel("head")
  axes.set_ylabel("layer")
  axes.set_title(title, fontsize=9)
  figure.colorbar(image, ax=axes, label="block sparsity")
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path
