"""Where does the error/sparsity frontier of real heads lie in (τ, θ) space, and does a latent line reach it?

    python -m experiments.latent_frontier --length=1024 --layers=0,7,15,22,29
    python -m experiments.latent_frontier --noattention_sink --output=results/latent_frontier_nosink.json

Run from the repository root. Captures SmolLM2-135M's post-RoPE Q/K/V on State of the Union text,
evaluates a (τ, θ) grid with λ off on every head of the chosen layers (one launch per grid point of a
SpargeAttn `LayerEvaluator`), and reports per head the sparsest grid point whose relative L1 error stays
≤ ε_high ("frontier") against the sparsest point reachable along candidate latent lines (`LatentMap`
bounds). Writes results/latent_frontier.json and a Markdown table beside it. This is how the default
latent bounds were chosen; rerun it when the model, lengths or block size change.
"""

from __future__ import annotations

import json
import os
import platform

from absl import app
from absl import flags
import jax
import numpy as np

from afbs_jax import calibration, data
from afbs_jax.attention import LatentMap, SpargeMethod
from afbs_jax.model import iter_layer_qkv, load_gguf
from afbs_jax.tuner.evaluator import LayerEvaluator
from benchmarks import cli
from kernels.block_config import MIN_BLOCK, BlockConfigError, BlockSparseConfig

_LENGTH = flags.DEFINE_integer("length", 1024, "Tokens per evaluated sequence.")
_LAYERS = flags.DEFINE_list("layers", ["0", "7", "15", "22", "29"], "Layers to evaluate.")
_BLOCK = flags.DEFINE_integer("block_size", 64, f"block_q = block_k (a power of two >= {MIN_BLOCK}).")
_EPS_HIGH = flags.DEFINE_float("eps_high", 0.055, "Error ceiling.")
_GGUF = flags.DEFINE_string("gguf_path", None, "GGUF file (default: the embedded SmolLM2).")
_SINK = flags.DEFINE_bool("attention_sink", True, "Always keep key block 0.")
_OUT = flags.DEFINE_string("output", "results/latent_frontier.json", "Output JSON (a .md table beside it).")
_RENDER = flags.DEFINE_bool("render_only", False, "Only regenerate the .md table from --output.")

TAUS = (1.0, 0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.9, 0.8, 0.6)
THETAS = (-0.1, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# Candidate latent lines (τ from tau_max = 1, θ from theta_max), evaluated with λ off. s = 0 is dense
# (tau_max = 1 keeps every allowed block), whatever θ is.
LINES = {
    "default: tau 1->0.8, theta 0.2->-0.1": LatentMap(tau_min=0.8, theta_max=0.2, theta_min=-0.1),
    "tau 1->0.5, theta 1->0.1": LatentMap(tau_min=0.5, theta_max=1.0, theta_min=0.1),
    "tau 1->0.8, theta 1->-0.1": LatentMap(tau_min=0.8, theta_max=1.0, theta_min=-0.1),
    "tau 1->0.6, theta 0.5->-0.1": LatentMap(tau_min=0.6, theta_max=0.5, theta_min=-0.1),
    "tau 1->0.7, theta 0.3->-0.1": LatentMap(tau_min=0.7, theta_max=0.3, theta_min=-0.1),
    "tau 1->0.5, theta 0.3->0.0": LatentMap(tau_min=0.5, theta_max=0.3, theta_min=0.0),
    "tau 1->0.8, theta -0.1 (filter off)": LatentMap(tau_min=0.8, theta_max=-0.1, theta_min=-0.1),
    "tau 1->0.6, theta -0.1 (filter off)": LatentMap(tau_min=0.6, theta_max=-0.1, theta_min=-0.1),
}
S_GRID = np.linspace(0.0, 1.0, 41)
LAMBDA_OFF = {"lam": -np.inf}  # no P·V skip: the frontier is the mask's alone


def main(argv):
  del argv
  if _RENDER.value:
    with open(_OUT.value) as f:
      result = json.load(f)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
      f.write(render_markdown(result))
    return
  try:
    blocks = BlockSparseConfig.square(_BLOCK.value)
  except BlockConfigError as e:
    raise app.UsageError(f"--block_size: {e}") from None
  method = SpargeMethod(attention_sink=_SINK.value)
  model, tokenizer = load_gguf(_GGUF.value)
  corpus = data.load_corpus("sotu")
  tokens = calibration.calibration_tokens(tokenizer, corpus.train, num_inputs=1, length=_LENGTH.value)
  wanted = {int(x) for x in _LAYERS.value}
  rows = []
  for layer, q, k, v in iter_layer_qkv(model, tokens):
    if layer not in wanted:
      continue
    ev = LayerEvaluator(q, k, v, low_len=_LENGTH.value, method=method, blocks=blocks)
    heads = ev.num_heads
    grid = {}
    for tau in TAUS:
      for theta in THETAS:
        grid[(tau, theta)] = ev.evaluate_params({"tau": tau, "theta": theta, **LAMBDA_OFF}, "high", 0)
    lines = {}
    for name, latent in LINES.items():
      best = np.zeros(heads)
      for s in S_GRID:
        params = latent.param_dict(np.full(heads, s, np.float32)) | LAMBDA_OFF
        err, sp = ev.evaluate_params(params, "high", 0)
        best = np.where(err <= _EPS_HIGH.value, np.maximum(best, sp), best)
      lines[name] = best.tolist()
    frontier = np.zeros(heads)
    argbest = [None] * heads
    for key, (err, sp) in grid.items():
      for h in range(heads):
        if err[h] <= _EPS_HIGH.value and sp[h] > frontier[h]:
          frontier[h], argbest[h] = sp[h], key
    rows.append({"layer": layer, "frontier_sparsity": frontier.tolist(), "frontier_params": argbest,
                 "line_sparsity": lines,
                 "grid": {f"{t},{th}": {"error": e.tolist(), "sparsity": s.tolist()}
                          for (t, th), (e, s) in grid.items()}})
    print(f"layer {layer}: frontier mean {frontier.mean():.3f} at {argbest}")
    for name, best in lines.items():
      print(f"   {name}: mean {np.mean(best):.3f}")
  result = {"device": jax.devices()[0].device_kind, "machine": platform.processor() or platform.machine(),
            "length": _LENGTH.value, "attention_sink": _SINK.value, "block_size": _BLOCK.value,
            "eps_high": _EPS_HIGH.value, "rows": rows}
  print(f"wrote {_OUT.value} and {cli.write_results(result, _OUT.value, render_markdown)}")


def render_markdown(result: dict) -> str:
  """Mean over heads, per layer: the grid frontier and each latent line's best sparsity at error ≤ ε_high."""
  names = list(result["rows"][0]["line_sparsity"])
  lines = [f"# Error/sparsity frontier ({result['device']}, {result['length']} tokens, block "
           f"{result['block_size']}, sink {result.get('attention_sink')}, error ≤ {result['eps_high']})", "",
           "Mean block sparsity over heads of the sparsest setting whose relative L1 error stays ≤ ε_high: on the "
           "(τ, θ) grid, and along each candidate latent line (λ off). Generated by "
           "`python -m experiments.latent_frontier`.", "",
           "| layer | grid frontier | " + " | ".join(names) + " |",
           "|---|---:|" + "---:|" * len(names)]
  for row in result["rows"]:
    cells = [f"{np.mean(row['line_sparsity'][name]):.3f}" for name in names]
    lines.append(f"| {row['layer']} | {np.mean(row['frontier_sparsity']):.3f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
