"""Forward throughput (tokens/s) of the Llama model, dense vs SpargeAttention at one fixed setting.

    python -m benchmarks.model_throughput                                  # GPU: smollm2 shape, 8K context
    python -m benchmarks.model_throughput --seq_len=1024 --runs=3          # CPU smoke check
    python -m benchmarks.model_throughput --weights=random                 # random weights of the config

Run from the repository root. Builds the model of `--config` through `afbs_jax.pipeline.load_model`: the
embedded SmolLM2 GGUF on State of the Union text when available (real attention, so the SpargeAttention
density means something), else random weights on random tokens (throughput does not depend on weight
values; the JSON says which), jits the whole forward once per attention policy, excludes compilation
from the timings and reports the median of `--runs` timed forwards. The SpargeAttention policy uses the
same (tau, theta, lam) in every layer and head; its achieved block density (kept / causal-valid blocks,
averaged over layers, heads and batch) is measured on the same tokens so the speed-up can be read
against it. Writes results/model_throughput.json (device kind, jax version, settings, timings) and
results/model_throughput.md, generated from the JSON.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np

import configs
from afbs_jax import data, pipeline
from afbs_jax import model as model_lib
from afbs_jax.attention import TunedAttention
from afbs_jax.model.llama import jitted_forward
from benchmarks import cli
from kernels import block_config

# Its own FlagValues: other benchmarks define the same names (`benchmarks.cli`).
FLAGS = cli.module_flags()
_CONFIG = flags.DEFINE_enum("config", "smollm2", tuple(configs.CONFIG_MODULES),
                            "Model config name (configs.get_config).", flag_values=FLAGS)
_WEIGHTS = flags.DEFINE_enum("weights", "auto", ["auto", "random", "gguf"],
                             "random: random weights of the config; gguf: the embedded SmolLM2 GGUF; auto: "
                             "gguf for the smollm2 config when the GGUF is installed, else random.", flag_values=FLAGS)
_GGUF_PATH = flags.DEFINE_string("gguf_path", None, "GGUF file for --weights=gguf (default: the embedded one).", flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "Tokens per sequence.", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per forward.", flag_values=FLAGS)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed forwards per policy (the median is reported).", flag_values=FLAGS)
_TAU = flags.DEFINE_float("tau", 0.9, "SpargeAttention tau in every layer and head.", flag_values=FLAGS)
_THETA = flags.DEFINE_float("theta", 0.2, "SpargeAttention theta in every layer and head.", flag_values=FLAGS)
_LAM = flags.DEFINE_float("lam", float("-inf"), "SpargeAttention lambda (<= 0; -inf never skips P·V).", flag_values=FLAGS)
_BLOCK = flags.DEFINE_integer("block", 64, "SpargeAttention block_q = block_k (a power of two >= "
                              f"{block_config.MIN_BLOCK}).", flag_values=FLAGS)
_BACKEND = flags.DEFINE_enum("backend", "auto", block_config.backend_names(),
                             "Kernel backend (auto picks per platform).", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", os.path.join("results", "model_throughput.json"),
                              "Where to write the JSON (the Markdown table goes beside it).", flag_values=FLAGS)


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
  config = configs.get_config(config_name)
  config.model_format = weights  # "gguf" or "random": load_model reads the weights this names
  if weights == "gguf":
    config.model_path = _GGUF_PATH.value or ""
  model, tokenizer = pipeline.load_model(config)
  if weights == "gguf":
    ids = tokenizer.encode(data.load_corpus("sotu").train[: 8 * batch * seq_len])
    if len(ids) < batch * seq_len:
      raise ValueError(f"the corpus gives {len(ids)} tokens; batch * seq_len = {batch * seq_len}")
    tokens = np.asarray(ids[: batch * seq_len], np.int32).reshape(batch, seq_len)
    return model, tokens, (f"SmolLM2-135M-Instruct Q4_1 GGUF dequantised to {model.config.param_dtype}, "
                           "on State of the Union text")
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model.config.vocab_size, size=(batch, seq_len), dtype=np.int32)
  return model, tokens, (
      f"random weights of the {config_name} config ({model.config.param_dtype}) on random tokens; throughput "
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


def block_density(model: model_lib.Llama, tokens: np.ndarray, policy: TunedAttention) -> float:
  """Kept / causal-valid blocks of `policy`, averaged over layers, heads and batch, on `tokens`.

  Each layer's density is the one its method reports when it attends (what the tuner measures too), on
  that layer's Q/K/V from the dense forward.
  """
  densities = []
  for layer, q, k, v in model_lib.iter_layer_qkv(model, tokens):
    params = {name: table[layer] for name, table in policy.tables.items()}
    _, density = policy.method.attend(q, k, v, params, policy.blocks)  # density: [batch, heads]
    densities.append(float(np.mean(density)))
  return float(np.mean(densities))


def where_time_goes(model: model_lib.Llama, tokens: np.ndarray, policy: TunedAttention,
                    runs: int) -> dict[str, float]:
  """Milliseconds per forward, summed over layers, of each attention step timed alone on that layer's
  real Q/K/V (from the dense forward): dense attention (the dense model's), and of the sparse policy its
  mask prediction, the mask's compaction to kept-block lists (`mask_to_kv_indices`), and its whole
  attention (prediction, compaction and the kernel, as the model runs it); `sparse_kernel` is the whole
  less the two steps. The model's other work (projections, MLPs, norms, embeddings, head) is the dense
  forward less its attention, set by the caller.
  """
  # pylint: disable=g-import-not-at-top
  from afbs_jax.attention.dense import DenseAttention
  from benchmarks.kernel_bench import time_jax
  from kernels.block_index import causal_block_mask, mask_to_kv_indices
  # pylint: enable=g-import-not-at-top
  method, blocks = policy.method, policy.blocks
  dense = jax.jit(lambda q, k, v: DenseAttention()(q, k, v, layer=0))
  predict = jax.jit(lambda q, k, params: method.block_mask(q, k, params, blocks))
  compact = jax.jit(mask_to_kv_indices)
  attend = jax.jit(lambda q, k, v, params: method.attend(q, k, v, params, blocks)[0])
  totals = dict(dense_attention=0.0, sparse_prediction=0.0, sparse_compaction=0.0, sparse_attention=0.0)
  for layer, q, k, v in model_lib.iter_layer_qkv(model, tokens):
    params = {name: table[layer] for name, table in policy.tables.items()}
    valid = causal_block_mask(q.shape[1], k.shape[1], causal=blocks.causal, block_q=blocks.block_q,
                              block_k=blocks.block_k)
    mask = jax.block_until_ready(predict(q, k, params) & valid)
    totals["dense_attention"] += time_jax(dense, q, k, v, reps=runs)
    totals["sparse_prediction"] += time_jax(predict, q, k, params, reps=runs)
    totals["sparse_compaction"] += time_jax(compact, mask, reps=runs)
    totals["sparse_attention"] += time_jax(attend, q, k, v, params, reps=runs)
  totals["sparse_kernel"] = (totals["sparse_attention"] - totals["sparse_prediction"]
                             - totals["sparse_compaction"])
  return totals


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
  breakdown = results.get("breakdown_ms")
  if breakdown:
    forward_ms = 1e3 * dense_s
    lines += ["", "Where the time goes: each step timed alone on every layer's real Q/K/V, summed over "
              "layers (ms per forward; `rest` = dense forward − dense attention).", "",
              "| step | ms | share of the dense forward |", "|---|---|---|"]
    for step, ms in breakdown.items():
      lines.append(f"| {step.replace('_', ' ')} | {ms:.2f} | {ms / forward_ms:.1%} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  weights = resolve_weights(_CONFIG.value, _WEIGHTS.value)
  model, tokens, weights_note = build(_CONFIG.value, weights, _BATCH.value, _SEQ_LEN.value)
  config = model.config
  try:
    sparge_policy = model_lib.SpargeAttention.constant(
        config.num_layers, config.num_heads, tau=_TAU.value, theta=_THETA.value, lam=_LAM.value,
        block_q=_BLOCK.value, block_k=_BLOCK.value, backend=_BACKEND.value)
  except block_config.BlockConfigError as e:
    raise app.UsageError(f"--block, --backend: {e}") from None
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
  breakdown = where_time_goes(model, tokens, sparge_policy, _RUNS.value)
  breakdown["rest_of_model"] = 1e3 * rows["dense"]["median_s"] - breakdown["dense_attention"]
  print("where the time goes (ms per forward):", {k: round(v, 3) for k, v in breakdown.items()}, flush=True)
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
      breakdown_ms=breakdown,
  )
  cli.write_results(results, _OUTPUT.value, markdown)
  print(markdown(results))


if __name__ == "__main__":
  cli.run(main, FLAGS)
