"""Which decode τ do real heads need? The range `DecodeMethod`'s latent must span, measured per head.

    python -m experiments.decode_tau_range                          # SmolLM2-135M, 2048 tokens, 5 layers
    python -m experiments.decode_tau_range --length=8192 --layers=0,15,29

Run from the repository root. Captures SmolLM2-135M's post-RoPE Q/K/V on State of the Union text (the
training split, as the tuner calibrates), scores decode τ on a grid with the tuner's own evaluator
(`LayerEvaluator` of `DecodeMethod`: the last `--decode_steps` positions, each a one-token chunk against
the cache up to itself, relative L1 error against dense attention, per head) and reports, per error
ceiling (the ε_high of the experiments' bands), each head's *needed τ*: the lowest grid τ whose error and
every higher τ's stay within the ceiling (τ = 1 is exact). The latent's floor `DECODE_TAU_MIN` should sit
below the needed τ of the heads at the widest band, or the tuner cannot reach their sparsity. Writes
results/decode_tau_range.json and a Markdown table beside it; says which machine it ran on.
"""

from __future__ import annotations

import platform

from absl import app
from absl import flags
import jax
import numpy as np

from afbs_jax import calibration, data
from afbs_jax.attention.decode import DECODE_TAU_MIN, DecodeMethod
from afbs_jax.model import iter_layer_qkv, load_gguf
from afbs_jax.tuner.evaluator import LayerEvaluator
from benchmarks import cli
from kernels.block_config import MIN_BLOCK, BlockConfigError, BlockSparseConfig
from kernels.decode_sparse_reference import DECODE_TAU_RULE

# Its own FlagValues (benchmarks.cli): the tests import this module beside afbs_jax.main's global flags.
FLAGS = cli.module_flags()
_LENGTH = flags.DEFINE_integer("length", 2048, "Tokens per evaluated sequence (the cache the steps read).",
                               flag_values=FLAGS)
_LAYERS = flags.DEFINE_list("layers", ["0", "7", "15", "22", "29"], "Layers to evaluate.", flag_values=FLAGS)
_BLOCK = flags.DEFINE_integer("block_size", 64, f"Cache block size (a power of two >= {MIN_BLOCK}).",
                              flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("decode_steps", 16, "Decode steps scored (the last positions).", flag_values=FLAGS)
_GGUF = flags.DEFINE_string("gguf_path", None, "GGUF file (default: the embedded SmolLM2).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("output", "results/decode_tau_range.json", "Output JSON (a .md table beside it).",
                           flag_values=FLAGS)

TAUS = (1.0, 0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
CEILINGS = (0.03, 0.055, 0.11, 0.22)   # ε_high of experiments.common's bands


def needed_tau(errors: np.ndarray, ceiling: float) -> np.ndarray:
  """f32 [heads]: per head, the lowest τ of `TAUS` (descending) whose error and every higher τ's are
  <= ceiling. errors: [len(TAUS), heads]."""
  within = np.logical_and.accumulate(errors <= ceiling, axis=0)     # prefix from τ = 1 down
  lowest = within.sum(axis=0) - 1                                    # index of the last τ still within
  return np.asarray(TAUS, np.float32)[np.maximum(lowest, 0)]


def measure(model, tokens: np.ndarray, layers: set[int], blocks: BlockSparseConfig, steps: int) -> list[dict]:
  method = DecodeMethod(decode_steps=steps)
  rows = []
  for layer, q, k, v in iter_layer_qkv(model, tokens):
    if layer not in layers:
      continue
    evaluator = LayerEvaluator(q, k, v, low_len=tokens.shape[1], method=method, blocks=blocks)
    scored = [evaluator.evaluate_params({"tau": tau}, "high", 0) for tau in TAUS]
    errors = np.stack([np.asarray(e) for e, _ in scored])
    sparsity = np.stack([np.asarray(s) for _, s in scored])
    rows.append({"layer": layer, "error": errors.tolist(), "sparsity": sparsity.tolist(),
                 "needed_tau": {str(c): needed_tau(errors, c).tolist() for c in CEILINGS}})
    print(f"layer {layer}: needed τ at ε_high {CEILINGS[-1]}: median "
          f"{np.median(rows[-1]['needed_tau'][str(CEILINGS[-1])]):.2f}", flush=True)
  return rows


def main(argv):
  del argv
  try:
    blocks = BlockSparseConfig.square(_BLOCK.value)
  except BlockConfigError as e:
    raise app.UsageError(f"--block_size: {e}") from None
  if _STEPS.value < 1 or _STEPS.value > _LENGTH.value:
    raise app.UsageError(f"--decode_steps must lie in [1, --length={_LENGTH.value}]; got {_STEPS.value}")
  model, tokenizer = load_gguf(_GGUF.value)
  tokens = calibration.calibration_tokens(tokenizer, data.load_corpus("sotu").train, num_inputs=1,
                                          length=_LENGTH.value)
  rows = measure(model, tokens, {int(x) for x in _LAYERS.value}, blocks, _STEPS.value)
  result = {"device": jax.devices()[0].device_kind, "machine": platform.processor() or platform.machine(),
            "jax": jax.__version__, "length": _LENGTH.value, "block_size": _BLOCK.value,
            "decode_steps": _STEPS.value, "tau_rule": DECODE_TAU_RULE, "tau_min": DECODE_TAU_MIN,
            "taus": list(TAUS), "ceilings": list(CEILINGS), "rows": rows}
  print(f"wrote {_OUT.value} and {cli.write_results(result, _OUT.value, render_markdown)}")


def render_markdown(result: dict) -> str:
  """Per ceiling: quartiles of the needed τ over every measured head, and the share below the floor."""
  needed = {c: np.concatenate([row["needed_tau"][str(c)] for row in result["rows"]]) for c in result["ceilings"]}
  sparsity = np.concatenate([np.asarray(row["sparsity"]) for row in result["rows"]], axis=1)  # [taus, heads]
  taus = result["taus"]
  lines = [f"# Decode τ each head needs ({result['device']}, {result['length']} tokens, block "
           f"{result['block_size']}, last {result['decode_steps']} positions, rule {result['tau_rule']})", "",
           f"Over {len(next(iter(needed.values())))} heads of layers "
           f"{', '.join(str(row['layer']) for row in result['rows'])}: the lowest τ whose relative L1 error (and "
           "every higher τ's) stays within the ceiling. Generated by `python -m experiments.decode_tau_range`.", "",
           "| ε_high | needed τ: 10 % | 25 % | median | 75 % | 90 % | heads below τ_min "
           f"{result['tau_min']} | heads at the grid's lowest τ ({min(taus):g}: may need less) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for c, values in needed.items():
    q = np.percentile(values, [10, 25, 50, 75, 90])
    lines.append(f"| {c} | " + " | ".join(f"{x:.2f}" for x in q) +
                 f" | {np.mean(values < result['tau_min'] - 1e-6):.0%} | {np.mean(values <= min(taus) + 1e-6):.0%} |")
  lines += ["", "Mean decode sparsity over the heads at each τ:", "",
            "| τ | " + " | ".join(f"{t:g}" for t in taus) + " |", "|---|" + "---:|" * len(taus),
            "| sparsity | " + " | ".join(f"{s:.3f}" for s in sparsity.mean(axis=1)) + " |"]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.run(main, FLAGS)
