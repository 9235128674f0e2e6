"""Forward throughput (tokens/s) of the Llama model, dense vs SpargeAttention at one fixed setting.

    python benchmarks/model_throughput.py                                  # GPU: smollm2 shape, 8K context
    python benchmarks/model_throughput.py --seq_len=1024 --runs=3          # CPU smoke check
    python benchmarks/model_throughput.py --weights=random                 # random weights of the config

Builds the model of `--config`: the embedded SmolLM2 GGUF on State of the Union text when available
(real attention, so the SpargeAttention density means something), else random weights on random tokens
(throughput does not depend on weight values; the JSON says which), jits the whole forward once per attention policy, excludes compilation from the
timings and reports the median of `--runs` timed forwards. The SpargeAttention policy uses the same
(tau, theta, lam) in every layer and head; its achieved block density (kept / causal-valid blocks,
averaged over layers, heads and batch) is measured on the same tokens so the speed-up can be read
against it. Writes results/model_throughput.json (device kind, jax version, settings, timings) and
results/model_throughput.md, generated from the JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # Run as a script from anywhere: configs/ and kernels/ live at the root.

import configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from afbs_jax import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from afbs_jax.model.llama import jitted_forward  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = flags.DEFINE_string("config", "smollm2", "Model config name (configs.get_config).")
_WEIGHTS = flags.DEFINE_enum("weights", "auto", ["auto", "random", "gguf"],
                             "random: random weights of the config; gguf: the embedded SmolLM2 GGUF; auto: "
                             "gguf for the smollm2 config when the GGUF is installed, else random.")
_GGUF_PATH = flags.DEFINE_string("gguf_path", None, "GGUF file for --weights=gguf (default: the embedded one).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per forward.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed forwards per policy (the median is reported).")
_TAU = flags.DEFINE_float("tau", 0.9, "SpargeAttention tau in every layer and head.")
_THETA = flags.DEFINE_float("theta", 0.2, "SpargeAttention theta in every layer and head.")
_LAM = flags.DEFINE_float("lam", float("-inf"), "SpargeAttention lambda (<= 0; -inf never skips P·V).")
_BLOCK = flags.DEFINE_integer("block", 64, "SpargeAttention block_q = block_k.")
_BACKEND = flags.DEFINE_string("backend", "auto", "kernels.sparge backend.")
_OUTPUT = flags.DEFINE_string("output", os.path.join(_REPO, "results", "model_throughput.json"),
                              "Where to write the JSON (the Markdown table goes beside it).")


def resolve_weights(config_name: str, weights: str) -> str:
  """Real weights make the SpargeAttention density meaningful (random attention is nearly uniform)."""
  if weights != "auto":
    return weights
  if config_name != "smollm2":
    return "random"
  if _GGUF_PATH.value:
    return "gguf"
  try:
    model_lib.default_gguf_path()
  except (ImportError, OSError, ValueError, RuntimeError):
    return "random"
  return "gguf"


def build(config_name: str, weights: str, batch: int, seq_len: int) -> tuple[model_lib.Llama, np.ndarray, str]:
  """The model, its int32 [batch, seq_len] input and a sentence describing the weights and input.

  Real weights read State of the Union text (the sotu training split); random weights read uniform ids.
  """
  if weights == "gguf":
    from afbs_jax.data import corpora  # pylint: disable=g-import-not-at-top

    model, tokenizer = model_lib.load_gguf(_GGUF_PATH.value)
    ids = tokenizer.encode(corpora.load_corpus("sotu").train[: 8 * batch * seq_len])
    if len(ids) < batch * seq_len:
      raise ValueError(f"the corpus gives {len(ids)} tokens; batch * seq_len = {batch * seq_len}")
    tokens = np.asarray(ids[: batch * seq_len], np.int32).reshape(batch, seq_len)
    return model, tokens, (f"SmolLM2-135M-Instruct Q4_1 GGUF dequantised to {model.config.param_dtype}, "
                           "on State of the Union text")
  config = configs.get_config(config_name).model
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, seq_len), dtype=np.int32)
  return model_lib.init_random(config, seed=0), tokens, (
      f"random weights of the {config_name} config ({config.param_dtype}) on random tokens; throughput "
      "only, not quality (random attention is near uniform, so SpargeAttention keeps almost every block)")


def time_forward(model: model_lib.Llama, tokens: np.ndarray, runs: int) -> dict[str, Any]:
  """Compile once, then time `runs` forwards of the jitted model (host->device copy excluded)."""
  graphdef, state = nnx.split(model)
  tokens = model.check_tokens(tokens)
  start = time.perf_counter()
  jitted_forward(graphdef, state, tokens).block_until_ready()
  compile_s = time.perf_counter() - start
  seconds = []
  for _ in range(runs):
    start = time.perf_counter()
    jitted_forward(graphdef, state, tokens).block_until_ready()
    seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds)
  return dict(compile_and_first_run_s=compile_s, run_s=seconds, median_s=median,
              tokens_per_s=tokens.size / median)


def block_density(model: model_lib.Llama, tokens: np.ndarray, policy: model_lib.SpargeAttention) -> float:
  """Kept / causal-valid blocks of `policy`, averaged over layers, heads and batch, on `tokens`."""
  from kernels import sparge  # pylint: disable=g-import-not-at-top

  densities = []
  for layer, q, k, _ in model_lib.iter_layer_qkv(model, tokens):
    params = sparge.SpargeParams(tau=policy.tau[layer], theta=policy.theta[layer], lam=policy.lam[layer])
    mask = sparge.predict_block_mask(q, k, params, causal=True, block_q=policy.block_q, block_k=policy.block_k,
                                     attention_sink=policy.attention_sink)
    n_q, n_k = mask.shape[-2:]
    # Causal-valid blocks for T == S: key block j can hold a key <= the last query of block i.
    valid = (np.arange(n_k)[None, :] * policy.block_k) <= np.minimum(
        (np.arange(n_q)[:, None] + 1) * policy.block_q, q.shape[1]) - 1
    densities.append(float(np.asarray(mask).sum(axis=(-1, -2)).mean() / valid.sum()))
  return float(np.mean(densities))


def markdown(results: dict[str, Any]) -> str:
  env, settings = results["environment"], results["settings"]
  lines = [f"# Model forward throughput: {settings['config']}, batch {settings['batch']} × "
           f"{settings['seq_len']} tokens", "",
           f"Device: {env['device_kind']} ({env['platform']}), jax {env['jax']}. Weights: {results['weights']}.",
           f"Median of {settings['runs']} forwards, compilation excluded.", "",
           "| attention | median s | tokens/s | vs dense | block density |", "|---|---|---|---|---|"]
  dense_s = results["policies"]["dense"]["median_s"]
  for name, row in results["policies"].items():
    density = row.get("block_density")
    lines.append(f"| {row['label']} | {row['median_s']:.4f} | {row['tokens_per_s']:,.0f} | "
                 f"{dense_s / row['median_s']:.2f}× | {'1.000' if density is None else f'{density:.3f}'} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  weights = resolve_weights(_CONFIG.value, _WEIGHTS.value)
  model, tokens, weights_note = build(_CONFIG.value, weights, _BATCH.value, _SEQ_LEN.value)
  config = model.config
  sparge_policy = model_lib.SpargeAttention.constant(
      config.num_layers, config.num_heads, tau=_TAU.value, theta=_THETA.value, lam=_LAM.value,
      block_q=_BLOCK.value, block_k=_BLOCK.value, backend=_BACKEND.value)
  policies = {
      "dense": (model, "dense (jax.nn.dot_product_attention)"),
      "sparge": (model.with_attention(sparge_policy),
                 f"SpargeAttention τ={_TAU.value}, θ={_THETA.value}, λ={_LAM.value}, block {_BLOCK.value}, "
                 f"backend {_BACKEND.value}"),
  }
  rows = {}
  for name, (policy_model, label) in policies.items():
    rows[name] = dict(label=label, **time_forward(policy_model, tokens, _RUNS.value))
    print(f"{name}: median {rows[name]['median_s']:.4f} s, {rows[name]['tokens_per_s']:,.0f} tokens/s", flush=True)
  rows["sparge"]["block_density"] = block_density(model, tokens, sparge_policy)
  device = jax.devices()[0]
  results = dict(
      environment=dict(device_kind=device.device_kind, platform=device.platform, jax=jax.__version__,
                       python=platform.python_version()),
      weights=weights_note,
      settings=dict(config=_CONFIG.value, model=config.name, weights=weights, seq_len=_SEQ_LEN.value,
                    batch=_BATCH.value, runs=_RUNS.value, tau=_TAU.value, theta=_THETA.value,
                    lam=_LAM.value if math.isfinite(_LAM.value) else str(_LAM.value),
                    block=_BLOCK.value, backend=_BACKEND.value, param_dtype=config.param_dtype),
      policies=rows,
      sparge_speedup=rows["dense"]["median_s"] / rows["sparge"]["median_s"],
  )
  os.makedirs(os.path.dirname(_OUTPUT.value), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(results, f, indent=2)
  table = markdown(results)
  with open(os.path.splitext(_OUTPUT.value)[0] + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
