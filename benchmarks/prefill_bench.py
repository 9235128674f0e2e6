"""Prefill of a Llama-2-7B-shaped model, dense (cuDNN) vs block-sparse attention, at 16K / 32K / 64K tokens.

The model is the project's Flax Llama (`afbs_jax.model.Llama`) with Llama-2-7B's shapes (32 layers, 32
heads of 128, hidden 4096, MLP 11008, vocab 32000) and *random* bf16 weights (N(0, 0.02²), drawn on the
device); RoPE is the model's own, with `max_position_embeddings` raised to the longest length (no
scaling). Prefill = one forward over the prompt (batch 1) to the last token's logits, run layer by layer:
one jitted decoder layer, compiled once per policy and length, called for each layer's weights (peak
memory: the weights plus one layer's activations). Attention runs through a policy with fixed masks,
`BlockMaskAttention` on the real backend ("auto": the Mosaic GPU kernel on sm90+ at 64/128 blocks), so
mask compaction and dispatch are timed as in a deployed model; dense is `DenseAttention` (cuDNN on GPU).

Sparse masks, per layer and per head (random kept blocks; the partially-masked diagonal blocks always kept):
  * borrowed: the block densities AFBS-BO tuned on SmolLM2-135M (a checkpoint, `--densities_from`),
    density = 1 − the checkpoint's block sparsity, mapped from SmolLM2's 30 layers × 9 heads onto 32 × 32 by
    `map_densities` (layer l reads source layer round(l · (30 − 1) / (32 − 1)): depth-proportional, first
    and last aligned; head h reads source head floor(h · 9 / 32): each source head fills a run of 3–4);
  * uniform: every head at `--uniform_density` (0.3).
Weights are random and densities borrowed, so this measures speed only; the output says so. Per length it
reports tokens/s, the speed-up over dense, and the attention alone (the same policy on q, k, v of the
model's shape, every layer's masks) with its share of the prefill time. Run from the repository root
(GPU; each command ~3–6 minutes on an H200, mostly compilation and the 64K dense forward):

  python -m benchmarks.prefill_bench --seq_lens=16384,32768 --densities_from=outputs/smollm2/checkpoint
  python -m benchmarks.prefill_bench --seq_lens=65536 --append --densities_from=outputs/smollm2/checkpoint
  python -m benchmarks.prefill_bench --quick --out=/tmp/prefill_quick.json     # CPU smoke run, < 20 s

Writes results/prefill_bench.json and results/prefill_bench.md (generated from the JSON, naming the GPU).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from typing import Any

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax import checkpoint
from afbs_jax.attention import BlockMaskAttention, DenseAttention
from afbs_jax.model import weights as weights_lib
from afbs_jax.model.config import LlamaConfig
from afbs_jax.model.llama import Llama
from benchmarks import cli
from kernels.block_config import BlockSparseConfig
from kernels.block_index import causal_block_mask

# Its own FlagValues: other benchmarks define the same names (`benchmarks.cli`).
FLAGS = cli.module_flags()
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["16384", "32768", "65536"], "Prompt lengths (tokens).",
    flag_values=FLAGS)
_DENSITIES_FROM = flags.DEFINE_string(
    "densities_from", None, "A tuned checkpoint directory (or a run directory holding checkpoint/) whose "
    "per-layer, per-head block sparsity gives the borrowed densities; none: only the uniform masks.",
    flag_values=FLAGS)
_UNIFORM = flags.DEFINE_float("uniform_density", 0.3, "Block density of the uniform masks (every head).",
    flag_values=FLAGS)
_BLOCKS = flags.DEFINE_string("blocks", "128x128", "block_q x block_k of the sparse masks.",
    flag_values=FLAGS)
_BACKEND = flags.DEFINE_string("backend", "auto", "Block-sparse backend of the sparse policy.",
    flag_values=FLAGS)
_RUNS = flags.DEFINE_integer("runs", 3, "Timed prefills per policy (the median is reported).",
    flag_values=FLAGS)
_QUICK = flags.DEFINE_bool("quick", False, "CPU smoke run: 2 layers, 4 heads, 512 tokens, reference backend.",
    flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "results/prefill_bench.json", "Where the JSON goes (.md beside it).",
    flag_values=FLAGS)
_APPEND = flags.DEFINE_bool("append", False, "Keep the lengths already in --out that this run does not redo.",
    flag_values=FLAGS)

WEIGHT_SCALE = 0.02


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run: the model shape, lengths, sparse layout and where the densities come from."""
  model: LlamaConfig
  seq_lens: tuple[int, ...]
  block_q: int = 128
  block_k: int = 128
  backend: str = "auto"
  runs: int = 3
  uniform_density: float = 0.3
  densities_from: str | None = None


def llama2_7b_shape(max_len: int) -> LlamaConfig:
  """Llama-2-7B's shapes (configs/llama2.py) with RoPE positions up to `max_len`, random-weight name."""
  return LlamaConfig(name="llama-2-7b-shaped (random weights)", vocab_size=32000, hidden_size=4096,
                     intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, rope_theta=10000.0,
                     rms_norm_eps=1e-5, max_position_embeddings=max(max_len, 4096), param_dtype="bfloat16")


def quick_settings(densities_from: str | None = None) -> Settings:
  model = LlamaConfig(name="llama-shaped quick (random weights)", vocab_size=1024, hidden_size=512,
                      intermediate_size=1376, num_layers=2, num_heads=4, num_kv_heads=4,
                      max_position_embeddings=512, param_dtype="bfloat16")
  return Settings(model=model, seq_lens=(512,), block_q=64, block_k=64, backend="reference", runs=1,
                  densities_from=densities_from)


# ----------------------------------------------------------------------------------------------------
# Model, masks.


class DeviceRandomTensors(Mapping):
  """HF-named weights drawn on the device in the model dtype (a 7B model in seconds, no host copy):
  matrices ~ N(0, WEIGHT_SCALE²), norm weights 1, as `weights.random_tensors` draws them on the host."""

  def __init__(self, config: LlamaConfig, seed: int = 0):
    self.shapes = weights_lib.expected_shapes(config)
    self.dtype = jnp.dtype(config.param_dtype)
    self.key = jax.random.key(seed)

  def __getitem__(self, name: str) -> jax.Array:
    shape = self.shapes[name]
    if len(shape) == 1:
      return jnp.ones(shape, self.dtype)
    key = jax.random.fold_in(self.key, list(self.shapes).index(name))
    return (WEIGHT_SCALE * jax.random.normal(key, shape, jnp.float32)).astype(self.dtype)

  def __iter__(self):
    return iter(self.shapes)

  def __len__(self) -> int:
    return len(self.shapes)


def map_densities(source: np.ndarray, layers: int, heads: int) -> np.ndarray:
  """[source layers, source heads] -> [layers, heads] by the rule in the module docstring."""
  source = np.asarray(source, np.float64)
  src_layers, src_heads = source.shape
  layer_of = np.rint(np.arange(layers) * (src_layers - 1) / max(layers - 1, 1)).astype(int)
  head_of = np.arange(heads) * src_heads // heads
  return source[layer_of][:, head_of]


def borrowed_densities(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """Per-layer, per-head block densities (1 − sparsity) of a tuned checkpoint's finished layers."""
  if os.path.isdir(os.path.join(path, "checkpoint")):
    path = os.path.join(path, "checkpoint")
  tuned = checkpoint.load_tuned(path)
  done = tuned.layers_done
  if done < 1:
    raise ValueError(f"the checkpoint under {path!r} has no tuned layer")
  meta = tuned.metadata
  source = dict(path=path, model=meta.get("model_name"), method=meta.get("method"),
                block_size=meta.get("block_size"), layers_done=done, num_layers=tuned.num_layers,
                heads=int(tuned.sparsity.shape[1]))
  return 1.0 - np.asarray(tuned.sparsity[:done], np.float64), source


def block_geometry(seq_len: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
  """(causal-valid, fully-unmasked) bool [n_q, n_k] block maps for causal T = S."""
  valid = causal_block_mask(seq_len, seq_len, causal=True, block_q=block_q, block_k=block_k)
  q_first = np.arange(valid.shape[0])[:, None] * block_q
  k_last = np.minimum(np.arange(valid.shape[1])[None, :] * block_k + block_k, seq_len) - 1
  return valid, k_last <= q_first


def random_masks(seed: int, densities: np.ndarray, *, seq_len: int, block_q: int, block_k: int) -> jax.Array:
  """bool [layers, 1, heads, n_q, n_k] on the device: the diagonal (partially masked) blocks plus random
  fully-unmasked blocks, each kept with the probability that brings head (l, h) to densities[l, h] of its
  causal-valid blocks. Drawn on the host, one layer at a time (no compilation)."""
  valid, full = block_geometry(seq_len, block_q, block_k)
  diagonal = valid & ~full
  keep = np.clip((np.asarray(densities) * valid.sum() - diagonal.sum()) / max(int(full.sum()), 1), 0.0, 1.0)
  rng = np.random.default_rng(seed)
  layers = []
  for layer_keep in keep:                                                      # [heads]
    draws = rng.random((1, len(layer_keep)) + valid.shape, dtype=np.float32)
    layers.append(jnp.asarray(diagonal | (full & (draws < layer_keep[None, :, None, None]))))
  return jnp.stack(layers)


# ----------------------------------------------------------------------------------------------------
# Prefill, layer by layer, and the attention alone.


def _policy(mask: jax.Array | None, blocks: BlockSparseConfig):
  """Dense, or BlockMaskAttention whose mask function returns the given (traced) layer mask."""
  if mask is None:
    return DenseAttention()
  return BlockMaskAttention(lambda q, k, layer: mask, block_q=blocks.block_q, block_k=blocks.block_k,
                            backend=blocks.backend)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _layer_step(graphdef: nnx.GraphDef, blocks: BlockSparseConfig, state: nnx.State, x: jax.Array,
                mask: jax.Array | None) -> jax.Array:
  positions = jnp.arange(x.shape[1], dtype=jnp.int32)
  return nnx.merge(graphdef, state)(x, positions, policy=_policy(mask, blocks), layer=0)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state).embed(tokens)


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state).logits(x[:, -1:])


@functools.partial(jax.jit, static_argnums=0)
def _attention(blocks: BlockSparseConfig, q: jax.Array, k: jax.Array, v: jax.Array,
               mask: jax.Array | None) -> jax.Array:
  return _policy(mask, blocks)(q, k, v, layer=0)


class Prefill:
  """A model split for layer-by-layer prefill: one layer graph, each layer's weights as its own state."""

  def __init__(self, model: Llama, blocks: BlockSparseConfig):
    self.blocks = blocks
    self.graphdef, self.state = nnx.split(model)
    self.layer_graphdef = nnx.split(model.layers[0])[0]
    self.layer_states = [nnx.split(layer)[1] for layer in model.layers]

  def __call__(self, tokens: jax.Array, masks: jax.Array | None) -> jax.Array:
    """tokens: int32 [1, T]; masks: bool [layers, 1, heads, n_q, n_k] or None (dense) -> last logits."""
    x = _embed(self.graphdef, self.state, tokens)
    for index, state in enumerate(self.layer_states):
      x = _layer_step(self.layer_graphdef, self.blocks, state, x, None if masks is None else masks[index])
    return _last_logits(self.graphdef, self.state, x)

  def attention_only(self, qkv: tuple[jax.Array, ...], masks: jax.Array | None) -> jax.Array:
    """Every layer's attention on the same q, k, v (each layer's own mask); the last output."""
    out = None
    for index in range(len(self.layer_states)):
      out = _attention(self.blocks, *qkv, None if masks is None else masks[index])
    return out


def time_call(fn, runs: int) -> tuple[float, float]:
  """(first call incl. compilation, median of `runs` timed calls) in seconds."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  seconds = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    seconds.append(time.perf_counter() - start)
  return first, statistics.median(seconds)


def bench_length(prefill: Prefill, settings: Settings, seq_len: int,
                 densities: dict[str, np.ndarray]) -> dict[str, Any]:
  """Dense and every sparse mask set at one length: tokens/s, speed-up, attention alone and its share."""
  config = settings.model
  tokens = jnp.asarray(np.random.default_rng(seq_len).integers(0, config.vocab_size, (1, seq_len)), jnp.int32)
  keys = jax.random.split(jax.random.key(seq_len), 3)
  shape = (1, seq_len, config.num_heads, config.head_dim)
  qkv = tuple(jax.random.normal(key, shape, jnp.dtype(config.param_dtype)) for key in keys)
  valid, _ = block_geometry(seq_len, settings.block_q, settings.block_k)
  policies: dict[str, Any] = {"dense": None}
  for name, table in densities.items():
    policies[name] = random_masks(seq_len + len(policies), table, seq_len=seq_len, block_q=settings.block_q,
                                  block_k=settings.block_k)
  rows: dict[str, Any] = {}
  for name, masks in policies.items():
    first_s, forward_s = time_call(lambda: prefill(tokens, masks), settings.runs)
    _, attention_s = time_call(lambda: prefill.attention_only(qkv, masks), settings.runs)
    row = dict(forward_s=forward_s, first_call_s=first_s, tokens_per_s=seq_len / forward_s,
               attention_s=attention_s, attention_share=attention_s / forward_s)
    if masks is not None:
      kept = np.asarray(jnp.sum(masks, axis=(1, 3, 4)), np.float64) / valid.sum()      # [layers, heads]
      row.update(block_density=float(kept.mean()), target_density=float(np.mean(densities[name])))
    rows[name] = row
    print(f"T={seq_len} {name}: {forward_s:.3f} s ({row['tokens_per_s']:,.0f} tokens/s), attention "
          f"{attention_s:.3f} s ({100 * row['attention_share']:.0f}%)", flush=True)
  for name, row in rows.items():
    row.update(speedup=rows["dense"]["forward_s"] / row["forward_s"],
               attention_speedup=rows["dense"]["attention_s"] / row["attention_s"])
  return rows


def run(settings: Settings, out: str | None = None, append: bool = False) -> dict[str, Any]:
  """Builds the model once, benchmarks every length, writes JSON and Markdown after each length."""
  config, blocks = settings.model, BlockSparseConfig(block_q=settings.block_q, block_k=settings.block_k,
                                                     causal=True, backend=settings.backend)
  densities: dict[str, np.ndarray] = {}
  source = None
  if settings.densities_from:
    table, source = borrowed_densities(settings.densities_from)
    densities["borrowed"] = map_densities(table, config.num_layers, config.num_heads)
  densities[f"uniform_{settings.uniform_density:g}"] = np.full((config.num_layers, config.num_heads),
                                                               settings.uniform_density)
  device = jax.devices()[0]
  resolved = blocks.for_platform(jax.default_backend(), head_dim=config.head_dim,
                                 dtype=jnp.dtype(config.param_dtype))[0].backend
  results: dict[str, Any] = dict(
      environment=dict(device_kind=device.device_kind, platform=device.platform, jax=jax.__version__,
                       python=platform.python_version()),
      note=("Random weights (N(0, 0.02²), bf16), random tokens: speed only, not quality. Sparse masks are "
            "random kept blocks (diagonal blocks always kept) at per-layer, per-head densities: "
            + ("'borrowed' from the SmolLM2 checkpoint named in densities_source (AFBS-BO's tuned block "
               "densities, 1 − sparsity), mapped 30 × 9 -> 32 × 32 by benchmarks.prefill_bench.map_densities "
               "(layer l <- round(l · (Ls − 1) / (L − 1)), head h <- floor(h · Hs / H)); " if source else "")
            + f"'uniform_{settings.uniform_density:g}' at that density in every head."),
      settings=dict(model=dataclasses.asdict(config), seq_lens=list(settings.seq_lens),
                    blocks=f"{settings.block_q}x{settings.block_k}", backend=settings.backend,
                    resolved_backend=resolved, runs=settings.runs, uniform_density=settings.uniform_density,
                    layer_by_layer=True, batch=1),
      densities_source=source, lengths={})
  if append and out and os.path.exists(out):
    with open(out) as file:
      results["lengths"] = json.load(file).get("lengths", {})
  # On a GPU the weights are drawn there (7B in seconds); elsewhere on the host (no per-shape compiles).
  tensors = weights_lib.random_tensors(config, scale=WEIGHT_SCALE) if device.platform == "cpu" else (
      DeviceRandomTensors(config))
  model = weights_lib.build_model(config, tensors)
  prefill = Prefill(model, blocks)
  for seq_len in settings.seq_lens:
    try:
      results["lengths"][str(seq_len)] = bench_length(prefill, settings, seq_len, densities)
    except Exception as error:  # pylint: disable=broad-except
      message = " ".join(str(error).split())[:500]
      fits = not any(word in message for word in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
      results["lengths"][str(seq_len)] = dict(error=f"{type(error).__name__}: {message}", fits=fits)
      print(f"T={seq_len}: {results['lengths'][str(seq_len)]['error']}", flush=True)
    if out:
      write(results, out)
  return results


# ----------------------------------------------------------------------------------------------------
# Report.


def markdown(results: dict[str, Any]) -> str:
  env, settings = results["environment"], results["settings"]
  model = settings["model"]
  lines = [f"# Prefill: {model['name']}", "",
           f"Device: {env['device_kind']} ({env['platform']}), jax {env['jax']}. {model['num_layers']} layers, "
           f"{model['num_heads']} heads × {model['hidden_size'] // model['num_heads']}, hidden "
           f"{model['hidden_size']}, MLP {model['intermediate_size']}, batch 1, layer by layer; sparse blocks "
           f"{settings['blocks']}, backend {settings['backend']} ({settings['resolved_backend']}); median of "
           f"{settings['runs']} prefills.", "", results["note"], "",
           "`attention s`: every layer's attention alone (same policy and masks, q/k/v of the model's shape); "
           "`share` = attention s / prefill s.", "",
           "| T | attention | block density | prefill s | tokens/s | speed-up | attention s | share | "
           "attention speed-up |", "|---|---|---|---|---|---|---|---|---|"]
  for seq_len, rows in sorted(results["lengths"].items(), key=lambda item: int(item[0])):
    if "error" in rows:
      lines.append(f"| {seq_len} | {'does not fit' if not rows['fits'] else 'failed'}: {rows['error'][:200]} "
                   "| | | | | | | |")
      continue
    for name, row in rows.items():
      density = row.get("block_density", 1.0)
      lines.append(f"| {seq_len} | {name} | {density:.3f} | {row['forward_s']:.3f} | {row['tokens_per_s']:,.0f} | "
                   f"{row['speedup']:.2f}× | {row['attention_s']:.3f} | {100 * row['attention_share']:.0f}% | "
                   f"{row['attention_speedup']:.2f}× |")
  return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str) -> None:
  cli.write_results(results, out, markdown)


def main(argv: list[str]) -> None:
  del argv
  if _QUICK.value:
    settings = quick_settings(_DENSITIES_FROM.value)
  else:
    block_q, block_k = map(int, _BLOCKS.value.split("x"))
    seq_lens = tuple(int(x) for x in _SEQ_LENS.value)
    settings = Settings(model=llama2_7b_shape(max(seq_lens)), seq_lens=seq_lens, block_q=block_q,
                        block_k=block_k, backend=_BACKEND.value, runs=_RUNS.value,
                        uniform_density=_UNIFORM.value, densities_from=_DENSITIES_FROM.value)
  results = run(settings, out=_OUT.value, append=_APPEND.value)
  print(markdown(results))


if __name__ == "__main__":
  cli.run(main, FLAGS)
