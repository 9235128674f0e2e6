"""The sparse frontier: task accuracy against sparsity in prefill, in decode and in both, beside dense.

    python -m experiments.frontier                           # SmolLM2-135M, 5 tasks × 1K–8K × 100 samples
    python -m experiments.frontier --tasks=niah_single --lengths=8192   # one slice of it per GPU call
    python -m experiments.frontier --quick                   # the tiny random model on CPU (a smoke run)
    python -m experiments.frontier --merge_from=results,part_a,part_b   # join slices run side by side
    python -m experiments.frontier --phases=decode --decode_bands=0.35:0.45,0.7:0.9   # decode beyond the bands

Following The Sparse Frontier (Nawrot et al., 2025), every (task, length) of `afbs_jax/data/tasks.py`
is answered greedily by dense attention and by each sparse method at each sparsity level, on the same
seeded samples, and each cell is compared with dense by the exact McNemar test (α = 0.05;
`afbs_jax.eval.tasks.mcnemar`). A cell is *not significantly worse* unless p < α with dense the more
accurate; a method's *frontier* for a (task, phase) is the largest level at which it and every lower
level are not significantly worse (a noisy pass above a failure does not count), per length and with the
samples of every length pooled into one paired test.

Phases: `prefill` (a sparse prefill policy, dense decode), `decode` (dense prefill, then a sparse decode
policy, `DecodeSparseAttention`) and `both`. Prefill methods, each held to the level as a block-sparsity
target by exact counting or bisection: `sparge_global` (ours: SpargeAttn's predictor and our block-sparse
kernel, one τ fitted to the target), `topk_block` (a fixed top-k block budget by true attention mass: an
oracle) and `vertical_slash` (MInference's pattern, `afbs_jax.baselines.vertical_slash`). Decode:
`decode_topk` keeps, at each step, the sink and local blocks plus the top-k cache blocks by SpargeAttn's
pooled score, k set so that 1 − level of the cache's blocks are read at the first decode step of the
longest prompt (`decode_budget`; its sparsity saturates where sink and local blocks alone exceed the
budget). `both` pairs each prefill method with `decode_topk` at the same level.

AFBS-BO is tuned at each of the setting's error bands for both phases: its prefill thresholds as every
experiment tunes them (`Workbench.tune`, checkpoints shared with the other experiments), its per-head decode τ
by `afbs_decode_policy` (`pipeline.tune_decode`: `DecodeMethod`'s top-CDF rule, the same band, calibration
inputs and budgets, scored on the last `tune.decode_steps` positions) into the `decode/` sub-directory of the
band's prefill checkpoint, where `afbs_jax.main --tune_decode` puts it; each is tuned on first use, then
loaded (a partial one resumes layer by layer). It runs in all three phases (`both`: its prefill and decode
policies of the same band) and has no sparsity knob: its level is the sparsity it reaches on the task's first
prompt, the prefill block sparsity in prefill, the decode sparsity of its greedy answer (all `MAX_NEW_TOKENS`
− 1 decode steps, `generate(return_stats=True)`) in decode, and the mean of the two in both. `--decode_bands`
adds bands for the decode phase alone (tuned the same way), to find where per-head decode τ starts to lose
when every band of the setting holds; their cells join the tables and frontiers but not the grid's
completeness. Every cell also records the prefill sparsity measured on its (task, length)'s first prompt (its
first (1 − LENGTH_TOLERANCE) · length tokens, which every prompt of the length reaches, so the measurement
compiles once per length) and the decode sparsity (its budget's, or AFBS-BO's measured one).

Prompts are right-padded in batches (`generate`): shorter prompts (at most 1 % below the length) pool that
padding into the last query block, which SpargeAttn's and vertical-slash's predictions read. A run resumes:
results/frontier.json is rewritten after every cell and cells already there are kept, so slices run in
separate calls (`--tasks`, `--lengths`, `--num_samples`, `--phases`) merge into one file. The full grid is 20
(task, length) pairs × (dense + 3 × 6 prefill + 6 decode + 3 × 6 both + 3 phases × 4 AFBS-BO bands) = 1,100
cells of 100 greedy answers of up to 16 tokens (AFBS-BO's decode and both cells one more, of one prompt, to
measure their decode sparsity), after tuning AFBS-BO once per band; fewer where dense answers nothing (below).
On an H200 (the `first_batch_seconds` and `answer_seconds` of results/frontier.json, with 5–12 processes
sharing the GPU) a method's first cell at a length takes up to 3½ minutes, mostly compiling, and the median
cell 2.4 s, except `topk_block`'s oracle at 8K (about a minute a cell); tuning the four bands' decode τ took
three minutes. Slices run side by side on one GPU in separate processes (their compilations overlap) need a
memory cap each (`XLA_PYTHON_CLIENT_MEM_FRACTION`): eleven uncapped processes at 4K–8K ran out of memory on
the H200. Compiling `generate` takes longer than a cell's answers, so cells share compiled programs: every
batch of a length has one shape, whatever the task (`--batch_size` prompts, default 8, padded to the length's
prompt size), and per length and phase the prefill compiles once for dense, once per prefill method for all
its levels (the baselines get the level as a traced f32 target, `afbs_jax.baselines.policy`) and once for
AFBS-BO's bands (traced threshold tables); the decode loop once for dense decode and once per decode rule
(`decode_topk`'s k for all its levels, AFBS-BO's τ for all bands: table leaves of `DecodeSparseAttention`).
That is about a dozen compilations per length, not one per cell (in the quick run's cell timings on a 2-core
CPU, a method's second level answers in 0.3 s, against 13-24 s when every level compiled).
"""

from __future__ import annotations

from collections.abc import Sequence
import itertools
import math
import time
from typing import Any

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from afbs_jax import baselines
from afbs_jax.attention.decode import DecodeSparseAttention
from afbs_jax.data import tasks as data_tasks
from afbs_jax.eval import tasks as eval_tasks
from afbs_jax.model import generate
from experiments import common
from kernels.decode_sparse import DECODE_BACKENDS

_TASKS = flags.DEFINE_list("tasks", None, "Tasks to run (default: the setting's).")
_LENGTHS = flags.DEFINE_list("lengths", None, "Prompt lengths in tokens (default: the setting's; a length at the "
                             "model's context leaves room for the answer).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Samples per (task, length) (default: the setting's).")
_PHASES = flags.DEFINE_list("phases", None, "Phases to run: prefill, decode, both (default: all).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Prompts per generate call (default: the setting's).")
_DECODE_BANDS = flags.DEFINE_list("decode_bands", None, "Extra AFBS-BO error bands for the decode phase only, "
                                  "as low:high (e.g. 0.35:0.45), beyond the setting's: where per-head decode τ "
                                  "starts to lose; their cells are kept beside the grid, not part of it.")

PHASES = ("prefill", "decode", "both")
PREFILL_METHODS = ("sparge_global", "topk_block", "vertical_slash")
DECODE_METHOD = "decode_topk"
AFBS = "afbs"
DENSE = "dense"
LEVELS = {"quick": (0.5, 0.9), "full": (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)}
TASKS = {"quick": ("niah_single",), "full": data_tasks.TASKS}
LENGTHS = {"quick": (512,), "full": data_tasks.LENGTHS}
NUM_SAMPLES = {"quick": 4, "full": 100}
BATCH_SIZE = {"quick": 4, "full": 8}  # prompts per generate call (--batch_size)
SEED = 0
MAX_NEW_TOKENS = eval_tasks.MAX_NEW_TOKENS
ALPHA = eval_tasks.ALPHA


def run(setting: common.Setting, *, results_dir: str, work_dir: str, backend: str = "auto",
        model_path: str | None = None, tasks: Sequence[str] | None = None, lengths: Sequence[int] | None = None,
        num_samples: int | None = None, phases: Sequence[str] = PHASES, levels: Sequence[float] | None = None,
        methods: Sequence[str] = PREFILL_METHODS, bands: Sequence[tuple[float, float]] | None = None,
        batch_size: int | None = None, decode_bands: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
  """Scores every missing cell of the requested slice, keeping the cells results_dir already holds;
  `batch_size` prompts per generate call (default: the setting's `BATCH_SIZE`); `decode_bands`: extra
  AFBS-BO bands measured in the decode phase only (when it is requested), outside the grid's
  completeness."""
  unknown = sorted(set(phases) - set(PHASES))
  if unknown:
    raise ValueError(f"unknown phases {unknown}; choose from {PHASES}")
  bench = common.Workbench(setting, work_dir=work_dir, backend=backend, model_path=model_path)
  tasks, lengths = tasks or TASKS[setting.name], [int(n) for n in lengths or LENGTHS[setting.name]]
  num_samples, levels = num_samples or NUM_SAMPLES[setting.name], tuple(levels or LEVELS[setting.name])
  bands = [tuple(band) for band in (setting.bands if bands is None else bands)]
  batch_size = BATCH_SIZE[setting.name] if batch_size is None else batch_size
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  previous = common.read_results("frontier", results_dir=results_dir, setting=setting)
  cells = list(previous["cells"]) if previous else []
  afbs = {band: _afbs_policies(bench, band, phases) for band in bands}
  extra = [tuple(band) for band in decode_bands if tuple(band) not in afbs] if "decode" in phases else []
  policies = afbs | {band: (None, afbs_decode_policy(bench, band)) for band in extra}
  for task in tasks:
    for length in lengths:
      prompt_len = min(length, bench.model.config.max_position_embeddings - MAX_NEW_TOKENS)
      samples = data_tasks.make_samples(task, prompt_len, num_samples, SEED, bench.tokenizer)
      where = dict(task=task, length=length, num_samples=num_samples)
      plan = _plan(phases, levels, methods, afbs) + [_spec("decode", AFBS, list(band)) for band in extra]
      done = {_key(cell) for cell in cells}
      dense = next((cell for cell in cells if _key(cell) == _key(where | _spec(DENSE, DENSE, None))), None)
      measured: dict[Any, float] = {}  # prefill policy -> its sparsity on this (task, length)'s first prompt
      for spec in [_spec(DENSE, DENSE, None)] + plan:
        if _key(where | spec) in done:
          continue
        if dense is not None and not np.any(dense["correct"]) and _skips_dense_fails(setting):
          print(f"frontier: dense answers none of {task} at {length}; its sparse cells are not measured",
                flush=True)
          break
        cell = _cell(bench, samples, where, spec, policies, dense, measured, batch_size, pad_to=prompt_len,
                     measure_len=math.ceil(prompt_len * (1 - data_tasks.LENGTH_TOLERANCE)))
        dense = cell if spec["method"] == DENSE else dense
        cells.append(cell)
        payload = _payload(cells, setting, levels, bands)
        common.write_results("frontier", payload, render(payload) + "\n\n" + discuss(payload),
                             results_dir=results_dir, setting=setting, figure=lambda path: plot(payload, path))
  return _payload(cells, setting, levels, bands)


def _spec(phase: str, method: str, knob: Any) -> dict[str, Any]:
  """What identifies a cell within a (task, length): phase, method and knob (a level, or an AFBS-BO band)."""
  return {"phase": phase, "method": method, "knob": knob}


def _key(cell: dict[str, Any]) -> tuple:
  knob = cell["knob"]
  return (cell["task"], cell["length"], cell["num_samples"], cell["phase"], cell["method"],
          tuple(knob) if isinstance(knob, (list, tuple)) else knob)


def _plan(phases: Sequence[str], levels: Sequence[float], methods: Sequence[str],
          afbs: dict[tuple[float, float], Any]) -> list[dict[str, Any]]:
  """Every phase's swept cells (a method at a level), then AFBS-BO's at each band of `afbs`."""
  plan = []
  for phase in phases:
    names = [DECODE_METHOD] if phase == "decode" else list(methods)
    plan += [_spec(phase, name, level) for name in names for level in levels]
    plan += [_spec(phase, AFBS, list(band)) for band in afbs]
  return plan


def _afbs_policies(bench: common.Workbench, band: tuple[float, float], phases: Sequence[str]) -> tuple[Any, Any]:
  """(prefill policy, decode policy) AFBS-BO tuned at `band`, each None where no requested phase runs it
  (a decode-only slice needs no prefill tuning, a prefill-only one no decode tuning)."""
  prefill = bench.tuned_policy(bench.tune(band)) if {"prefill", "both"} & set(phases) else None
  decode = afbs_decode_policy(bench, band) if {"decode", "both"} & set(phases) else None
  return prefill, decode


def afbs_decode_policy(bench: common.Workbench, band: tuple[float, float]) -> DecodeSparseAttention:
  """AFBS-BO's decode policy at `band`: `DecodeSparseAttention` with per-head τ_decode [layers, heads].

  Tuned by `Workbench.tune_decode` (`pipeline.tune_decode`, what `afbs_jax.main --tune_decode` runs: the
  same band, tune section and calibration inputs, `DecodeMethod` on the last `tune.decode_steps` positions)
  into the decode sub-directory of the band's prefill checkpoint; tuned on first use, then loaded.
  """
  return bench.tuned_policy(bench.tune_decode(band))


def measured_decode_sparsity(model: Any, tokens: Sequence[int], policy: Any) -> float:
  """The decode sparsity `policy` reaches while `model` (whose policy runs the prefill, so in `both` the
  cache is the sparse prefill's) answers one prompt greedily: 1 − kept / valid cache blocks, the mean over
  layers, heads and all MAX_NEW_TOKENS − 1 decode steps (`GenerationStats.decode_sparsity`).

  No stop token: an answer that ended at once would leave no decode step to count, and every cell then
  counts the same steps.
  """
  _, stats = generate(model, [list(tokens)], MAX_NEW_TOKENS, decode_policy=policy, return_stats=True)
  return stats.decode_sparsity


def decode_budget(level: float, prompt_len: int, block: int) -> tuple[int, float]:
  """(top_k, decode sparsity) for `level` at the first decode step after a `prompt_len`-token prompt.

  The step's query sees prompt_len + 1 keys in ceil((prompt_len + 1) / block) blocks; the block holding
  it and (beyond the first) the sink block are always read, top_k more are chosen (>= 1). round((1 −
  level) · blocks) read in all, or the forced ones plus one where that is fewer.
  """
  blocks = math.ceil((prompt_len + 1) / block)
  forced = min(blocks, 2)
  top_k = max(1, round((1.0 - level) * blocks) - forced)
  return top_k, 1.0 - min(blocks, forced + top_k) / blocks


def _policies(bench: common.Workbench, spec: dict[str, Any], afbs: dict, prompt_len: int):
  """(prefill policy or None, decode policy or None, decode sparsity or None) of one cell; AFBS-BO's decode
  sparsity is measured, not set (`_cell`)."""
  phase, method, knob = spec["phase"], spec["method"], spec["knob"]
  block = bench.setting.block_size
  if method == DENSE:
    return None, None, None
  if method == AFBS:
    prefill, decode = afbs[tuple(knob)]
    return None if phase == "decode" else prefill, None if phase == "prefill" else decode, None
  # A traced target (f32 []): the levels of a method share one compiled prefill (`baselines.policy`).
  prefill = None if phase == "decode" else baselines.get(method, sparsity=jnp.float32(knob), block_size=block,
                                                         backend=bench.backend)
  if phase == "prefill":
    return prefill, None, None
  top_k, decode_sparsity = decode_budget(knob, prompt_len, block)
  backend = bench.backend if bench.backend in DECODE_BACKENDS else "auto"
  return prefill, DecodeSparseAttention(top_k=top_k, block_size=block, backend=backend), decode_sparsity


def _cell(bench: common.Workbench, samples: list[data_tasks.Sample], where: dict[str, Any],
          spec: dict[str, Any], afbs: dict, dense: dict[str, Any] | None, measured: dict[Any, float],
          batch_size: int, pad_to: int | None = None, measure_len: int | None = None) -> dict[str, Any]:
  """One scored cell: accuracy, its Wilson interval, the McNemar test against dense, sparsities.

  Every batch is right-padded to `pad_to` positions (default: the longest sample), and the prefill
  sparsity is measured on the first `measure_len` tokens of the first prompt (default: all of it; every
  prompt of a length has at least the length's (1 − LENGTH_TOLERANCE) share), so that every task of one
  length runs the same shapes and shares its compiled programs with the other tasks.

  `measured` memoises prefill sparsity per policy (prefill and both share their prefill policies).
  AFBS-BO's level is the sparsity it reaches on the first prompt (the module docstring).
  """
  prompt_len = max(len(sample.tokens) for sample in samples)
  prefill, decode, decode_sparsity = _policies(bench, spec, afbs, prompt_len)
  model = bench.model if prefill is None else bench.model.with_attention(prefill)
  batch_size = min(batch_size, len(samples))
  # Timed in two parts (batches are independent): the first batch carries generate's compilation, so the
  # two times say whether compiling or answering dominates a cell.
  score = lambda part: eval_tasks.score_samples(model, part, bench.tokenizer, batch_size=batch_size,
                                                max_new_tokens=MAX_NEW_TOKENS,
                                                generate_options={"decode_policy": decode,
                                                                  "pad_to": max(prompt_len, pad_to or 0)})
  start = time.perf_counter()
  correct = score(samples[:batch_size])
  first_batch_seconds = time.perf_counter() - start
  if len(samples) > batch_size:
    correct = np.concatenate([correct, score(samples[batch_size:])])
  answer_seconds = time.perf_counter() - start
  if prefill is not None and prefill not in measured:
    measured[prefill] = bench.sparsity(prefill, length=min(measure_len or len(samples[0].tokens),
                                                           len(samples[0].tokens)),
                                       tokens=np.asarray(samples[0].tokens, np.int32))["sparsity"]
  prefill_sparsity = None if prefill is None else measured[prefill]
  if spec["method"] == AFBS and decode is not None:
    decode_sparsity = measured_decode_sparsity(model, samples[0].tokens, decode)
  reference = correct if dense is None else np.asarray(dense["correct"], bool)
  test = eval_tasks.mcnemar(reference, correct, alpha=ALPHA)
  rate = eval_tasks.accuracy(correct)
  level = (_afbs_level(prefill_sparsity, decode_sparsity) if spec["method"] == AFBS else
           0.0 if spec["method"] == DENSE else spec["knob"])
  return where | spec | {
      "prompt_tokens": prompt_len, "level": level, "prefill_sparsity": prefill_sparsity,
      "decode_sparsity": decode_sparsity, "correct": [int(x) for x in correct], "accuracy": rate.value,
      "low": rate.low, "high": rate.high, "only_dense": test.only_a, "only_sparse": test.only_b,
      "p_value": test.p_value, "not_worse": _not_worse(test),
      "first_batch_seconds": first_batch_seconds, "answer_seconds": answer_seconds}


def _afbs_level(prefill_sparsity: float | None, decode_sparsity: float | None) -> float:
  """An AFBS-BO cell's level: the sparsity of its sparse phase, the mean of both in `both` (where a swept
  method's one level is both phases' target)."""
  return float(np.mean([x for x in (prefill_sparsity, decode_sparsity) if x is not None]))


def _not_worse(test: eval_tasks.PairedTest) -> bool:
  return not (test.significant and test.only_a > test.only_b)


# --------------------------------------------------------------------------------------- frontier


def frontier(cells: list[dict[str, Any]], task: str, phase: str, method: str,
             length: int | None = None) -> dict[str, Any]:
  """The largest level at which `method` and every lower level are not significantly worse than dense.

  Per knob (a level or an AFBS-BO band) the samples of every measured length (or only `length`) are
  pooled into one paired McNemar test against dense's answers to the same samples; knobs are walked in
  order of their level (AFBS-BO's: the mean of its measured sparsities).

  Returns:
    {"level": the frontier (None when the lowest level already fails or nothing is measured),
     "levels": [{"level", "accuracy", "dense_accuracy", "p_value", "not_worse", "samples"}] ascending}.
  """
  dense = {(c["length"], c["num_samples"]): c for c in cells
           if c["task"] == task and c["method"] == DENSE and (length is None or c["length"] == length)}
  groups: dict[Any, list[dict[str, Any]]] = {}
  for c in cells:
    if (c["task"], c["phase"], c["method"]) == (task, phase, method) and (c["length"], c["num_samples"]) in dense:
      groups.setdefault(_key(c)[-1], []).append(c)
  rows = []
  for group in groups.values():
    group = sorted(group, key=lambda c: c["length"])
    ours = np.concatenate([c["correct"] for c in group]).astype(bool)
    theirs = np.concatenate([dense[(c["length"], c["num_samples"])]["correct"] for c in group]).astype(bool)
    test = eval_tasks.mcnemar(theirs, ours, alpha=ALPHA)
    rows.append({"level": float(np.mean([c["level"] for c in group])), "accuracy": test.accuracy_b,
                 "dense_accuracy": test.accuracy_a, "p_value": test.p_value, "not_worse": _not_worse(test),
                 "samples": test.total})
  rows.sort(key=lambda row: row["level"])
  best = None
  for row in rows:
    if not row["not_worse"]:
      break
    best = row["level"]
  return {"level": best, "levels": rows}


def answered_by_dense(cells: list[dict[str, Any]]) -> set[tuple[str, int]]:
  """The (task, length) pairs whose dense cell answers at least one sample.

  Where dense answers none, no method can be significantly worse (McNemar counts only the samples the
  two disagree on, and sparse can only gain there), so a frontier there bounds nothing: `run` measures
  no sparse cell for such a pair, and the frontiers leave out any that were measured.
  """
  return {(c["task"], c["length"]) for c in cells if c["method"] == DENSE and np.any(c["correct"])}


def _skips_dense_fails(setting: common.Setting) -> bool:
  """Whether `run` skips, and the frontiers leave out, the pairs dense answers none of: not in the quick
  run, whose random-weight model answers nothing and which exists to exercise every kind of cell."""
  return setting.name != "quick"


def _frontiers(cells: list[dict[str, Any]], *, skip_dense_fails: bool = True) -> list[dict[str, Any]]:
  """Per (task, phase, method) measured (where dense answers something, with `skip_dense_fails`): the
  pooled frontier and one per length."""
  if skip_dense_fails:
    answered = answered_by_dense(cells)
    cells = [c for c in cells if (c["task"], c["length"]) in answered]
  keys = sorted({(c["task"], c["phase"], c["method"]) for c in cells if c["method"] != DENSE},
                key=lambda k: (k[0], PHASES.index(k[1]), k[2]))
  lengths = sorted({c["length"] for c in cells})
  return [{"task": task, "phase": phase, "method": method,
           "pooled": frontier(cells, task, phase, method)["level"],
           "per_length": {str(n): frontier(cells, task, phase, method, n)["level"] for n in lengths
                          if any(c["length"] == n and c["phase"] == phase and c["method"] == method
                                 and c["task"] == task for c in cells)}}
          for task, phase, method in keys]


def _payload(cells: list[dict[str, Any]], setting: common.Setting, levels: Sequence[float],
             bands: Sequence[tuple[float, float]]) -> dict[str, Any]:
  per_pair = 1 + len(LEVELS[setting.name]) * (2 * len(PREFILL_METHODS) + 1) + len(PHASES) * len(setting.bands)
  grid_bands = {tuple(band) for band in setting.bands}   # `decode_bands` cells sit beside the grid
  full = [c for c in cells if c["num_samples"] == NUM_SAMPLES[setting.name]
          and (c["method"] != AFBS or tuple(c["knob"]) in grid_bands)]
  measured: dict[tuple[str, int], set] = {}
  for c in full:
    measured.setdefault((c["task"], c["length"]), set()).add(_key(c))
  answered = answered_by_dense(cells)
  dense_fails = sorted({(c["task"], c["length"]) for c in cells if c["method"] == DENSE} - answered
                       ) if _skips_dense_fails(setting) else []
  complete = all(pair in measured and (pair in dense_fails or len(measured[pair]) >= per_pair)
                 for pair in itertools.product(TASKS[setting.name], LENGTHS[setting.name]))
  return {"model": setting.model, "block_size": setting.block_size, "seed": SEED, "alpha": ALPHA,
          "max_new_tokens": MAX_NEW_TOKENS, "levels": list(levels), "bands": [list(b) for b in bands],
          "phases": list(PHASES), "cells": cells,
          "frontier": _frontiers(cells, skip_dense_fails=_skips_dense_fails(setting)),
          "dense_answers_none": [list(pair) for pair in dense_fails], "complete": complete}


# ------------------------------------------------------------------------------------------ report


def _name(phase: str, method: str) -> str:
  if method == AFBS:
    return "AFBS-BO"
  return method if phase != "both" else f"{method} + {DECODE_METHOD}"


def render(payload: dict[str, Any]) -> str:
  """Accuracy per level (✗: significantly worse than dense), AFBS-BO per phase and band, and the frontiers."""
  cells, levels = payload["cells"], payload["levels"]
  dense = {(c["task"], c["length"]): c for c in cells if c["method"] == DENSE}
  swept = sorted({(c["task"], c["length"], c["phase"], c["method"]) for c in cells
                  if c["method"] not in (DENSE, AFBS)},
                 key=lambda k: (k[0], k[1], PHASES.index(k[2]), k[3]))
  at = {(c["task"], c["length"], c["phase"], c["method"], c["knob"]): c for c in cells if c["method"] != AFBS}
  mark = lambda c: None if c is None else f"{c['accuracy']:.2f}" + ("" if c["not_worse"] else " ✗")
  grid = common.markdown_table(
      ["task", "length", "phase", "method", "dense", *[f"@ {level:g}" for level in levels]],
      [[task, length, phase, _name(phase, method), _acc(dense.get((task, length))),
        *[mark(at.get((task, length, phase, method, level))) for level in levels]]
       for task, length, phase, method in swept])
  afbs = sorted((c for c in cells if c["method"] == AFBS),
                key=lambda c: (c["task"], c["length"], PHASES.index(c["phase"]), tuple(c["knob"])))
  ours = common.markdown_table(
      ["task", "length", "phase", "band", "prefill sparsity", "decode sparsity", "accuracy", "dense",
       "p (McNemar)", "not worse"],
      [[c["task"], c["length"], c["phase"], f"[{c['knob'][0]:g}, {c['knob'][1]:g}]", c["prefill_sparsity"],
        c["decode_sparsity"], c["accuracy"], _acc(dense.get((c["task"], c["length"]))), c["p_value"],
        "yes" if c["not_worse"] else "no"]
       for c in afbs]) if afbs else "Not measured."
  lengths = sorted({c["length"] for c in cells})
  edge = common.markdown_table(
      ["task", "phase", "method", *[f"{n}" for n in lengths], "pooled"],
      [[row["task"], row["phase"], _name(row["phase"], row["method"]),
        *[_level(row["per_length"].get(str(n), "n/a")) for n in lengths], _level(row["pooled"])]
       for row in payload["frontier"]])
  notes = (f"Greedy answers (≤ {payload['max_new_tokens']} tokens) to the same seeded samples (seed "
           f"{payload['seed']}) for every method; ✗ marks a cell significantly worse than dense (exact McNemar, "
           f"α = {payload['alpha']:g}). Levels are block-sparsity targets (prefill: exact counting, sparge_global "
           "by bisection of one τ; decode: a top-k block budget at the first decode step); the measured prefill "
           "sparsity and the budget's decode sparsity of every cell are in the JSON. AFBS-BO's level is the "
           "sparsity it reaches on the first prompt (prefill: block sparsity; decode: over its greedy answer's "
           "decode steps; both: their mean). The frontier is the largest "
           "level at which a method and every lower level are not significantly worse; — where even the lowest "
           "fails. topk_block is an oracle (it reads the true attention). Decode sparsity acts from the second "
           "answer token on (the prefill's last position gives the first), so story_retrieval, whose answers are "
           "single words, tests the decode phase little; the needles' 7-digit numbers test it most."
           + _dense_fails_note(payload.get("dense_answers_none", []))
           + ("" if payload["complete"] else " Partial run: rerun the command to measure the missing cells."))
  return (f"## Accuracy by sparsity level\n\n{grid}\n\n## AFBS-BO by phase and error band\n\n{ours}\n\n"
          f"## Largest sparsity not significantly worse than dense, per length and pooled\n\n{edge}\n\n{notes}")


def _dense_fails_note(pairs: Sequence[Sequence[Any]]) -> str:
  if not pairs:
    return ""
  by_task: dict[str, list[str]] = {}
  for task, length in pairs:
    by_task.setdefault(task, []).append(str(length))
  listed = "; ".join(f"{task} at {', '.join(lengths)}" for task, lengths in sorted(by_task.items()))
  return (f" Dense answers none of the samples of {listed}: no method can be significantly worse there, so "
          "their sparse cells are not measured (those listed above were measured before this rule) and the "
          "frontiers leave them out.")


def _acc(cell: dict[str, Any] | None) -> str | None:
  return None if cell is None else f"{cell['accuracy']:.2f}"


def _level(level: Any) -> str:
  return "—" if level is None else level if isinstance(level, str) else f"{level:.3g}"


def discuss(payload: dict[str, Any]) -> str:
  """Two to four sentences from the numbers: each phase's tolerance of sparsity, per (task, length), for
  AFBS-BO's per-head thresholds and for the best fixed method, and the caveat of a weak dense baseline."""
  tolerance = phase_tolerance(payload["frontier"])
  sentences = []
  parts = [f"{np.median(edges['prefill']):.2f} in prefill and {np.median(edges['decode']):.2f} in decode for "
           f"{kind} ({len(edges['prefill'])} and {len(edges['decode'])} pairs)"
           for kind, edges in tolerance.items() if edges["prefill"] and edges["decode"]]
  if parts:
    sentences.append("Per (task, length), the median of the largest sparsity not significantly worse than dense is "
                     + "; ".join(parts) + " (— counts as 0; the best fixed method is the swept method, the oracle "
                     "topk_block among them, whose frontier is highest in that phase there).")
    verdicts = [f"{'so' if np.median(edges['decode']) > np.median(edges['prefill']) else 'not so'} for {kind}"
                for kind, edges in tolerance.items() if edges["prefill"] and edges["decode"]]
    sentences.append("The Sparse Frontier finds decode more tolerant of sparsity than prefill: here "
                     + " and ".join(verdicts) + ".")
  dense = [c["accuracy"] for c in payload["cells"] if c["method"] == DENSE]
  if payload["model"] == "tiny":
    sentences.append("The quick run's random-weight model answers nothing, so every method ties with dense: it "
                     "checks the pipeline, not sparsity.")
  elif dense and np.mean(dense) < 0.2:
    sentences.append(f"Dense {payload['model']} answers only {np.mean(dense):.0%} of samples on average, so "
                     "'not significantly worse' is a weak statement where dense itself fails.")
  return " ".join(sentences) or "Nothing measured yet."


def phase_tolerance(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
  """Per kind ("AFBS-BO", "the best fixed method") and phase (prefill, decode): the per-(task, length)
  frontiers of `_frontiers` rows, None (even the lowest knob fails) as 0.0, unmeasured pairs left out.

  The best fixed method's frontier at a (task, length) is the highest among the swept methods of that phase
  measured there: the most a user who picked the right fixed method could have reached.
  """
  tolerance: dict[str, dict[str, list[float]]] = {}
  for kind, is_kind in (("AFBS-BO", lambda method: method == AFBS),
                        ("the best fixed method", lambda method: method != AFBS)):
    tolerance[kind] = {}
    for phase in ("prefill", "decode"):
      best: dict[tuple[str, str], float] = {}
      for row in rows:
        if row["phase"] != phase or not is_kind(row["method"]):
          continue
        for length, level in row["per_length"].items():
          pair = (row["task"], length)
          best[pair] = max(best.get(pair, 0.0), level or 0.0)
      tolerance[kind][phase] = [best[pair] for pair in sorted(best)]
  return tolerance


def plot(payload: dict[str, Any], path: str) -> None:
  """Per task: accuracy (pooled over lengths) against level, a colour per method and a line style per phase,
  dense dashed; the (task, length) pairs dense answers none of are left out, as in the frontiers."""
  skipped = {tuple(pair) for pair in payload.get("dense_answers_none", [])}
  cells = [c for c in payload["cells"] if (c["task"], c["length"]) not in skipped]
  tasks = sorted({c["task"] for c in cells})
  figure, axes = common.new_figure(1, max(1, len(tasks)), size=(4.5 * max(1, len(tasks)), 4.0))
  axes = np.atleast_1d(axes)
  styles = {"prefill": "-", "decode": ":", "both": "--"}
  colours = {AFBS: "tab:blue", "sparge_global": "tab:orange", "topk_block": "tab:green",
             "vertical_slash": "tab:red", DECODE_METHOD: "tab:purple"}
  legend: dict[str, Any] = {}
  for axis, task in zip(axes, tasks):
    keys = sorted({(c["phase"], c["method"]) for c in cells if c["task"] == task and c["method"] != DENSE},
                  key=lambda k: (PHASES.index(k[0]), k[1]))
    for phase, method in keys:
      rows = frontier(cells, task, phase, method)["levels"]
      if rows:
        label = f"{phase}: {_name(phase, method)}"
        legend[label], = axis.plot([r["level"] for r in rows], [r["accuracy"] for r in rows], styles[phase],
                                   color=colours.get(method), marker="o" if method == AFBS else ".", label=label)
        axis.plot([r["level"] for r in rows if not r["not_worse"]],
                  [r["accuracy"] for r in rows if not r["not_worse"]], "x", color="black", markersize=4)
    dense = [c["accuracy"] for c in cells if c["task"] == task and c["method"] == DENSE]
    if dense:
      legend["dense"] = axis.axhline(float(np.mean(dense)), color="black", linestyle="--", linewidth=0.8)
    axis.set_title(task, fontsize=9)
    axis.set_xlabel("sparsity level")
    axis.set_ylim(-0.05, 1.05)
  axes[0].set_ylabel("accuracy, pooled over lengths (× worse than dense)")
  axes[-1].legend(list(legend.values()), list(legend), fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
  common.save_figure(figure, path)


def merge(setting: common.Setting, sources: Sequence[str], *, results_dir: str) -> dict[str, Any]:
  """Joins slices of one run measured into separate results directories (e.g. one process per task on one
  GPU: their compilations run in parallel) into `results_dir`, as one run would have written them.

  Cells are united by (task, length, samples, phase, method, knob), the first source's copy winning;
  sources of another setting, device kind, jax version, seed, levels or bands raise a ValueError. A later
  `run` in `results_dir` resumes the merged cells.
  """
  runs = common.read_partial_runs("frontier", sources, setting=setting,
                                  same=("levels", "bands", "seed", "alpha", "max_new_tokens", "block_size"))
  cells = common.union([part["cells"] for part in runs], key=_key)
  payload = _payload(cells, setting, runs[0]["levels"], [tuple(band) for band in runs[0]["bands"]])
  common.write_results("frontier", payload, render(payload) + "\n\n" + discuss(payload), results_dir=results_dir,
                       setting=setting, figure=lambda path: plot(payload, path),
                       env=common.merged_environment(runs))
  return payload


def parse_bands(values: Sequence[str]) -> tuple[tuple[float, float], ...]:
  """--decode_bands entries "low:high" as (low, high) pairs with 0 < low < high; a UsageError says which
  entry is not."""
  bands = []
  for value in values:
    try:
      low, high = (float(x) for x in value.split(":"))
    except ValueError:
      raise app.UsageError(f"--decode_bands: {value!r} is not low:high (e.g. 0.35:0.45)") from None
    if not 0 < low < high:
      raise app.UsageError(f"--decode_bands: {value!r} needs 0 < low < high")
    bands.append((low, high))
  return tuple(bands)


main = common.main_with_merge(common.main_for(
    run, render, discuss, tasks=lambda: _TASKS.value, num_samples=lambda: _NUM_SAMPLES.value,
    lengths=lambda: None if _LENGTHS.value is None else [int(n) for n in _LENGTHS.value],
    phases=lambda: tuple(_PHASES.value or PHASES), batch_size=lambda: _BATCH_SIZE.value,
    decode_bands=lambda: parse_bands(_DECODE_BANDS.value or [])), merge, render, discuss)


if __name__ == "__main__":
  app.run(main)
