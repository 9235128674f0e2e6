"""Table III and Fig. 5: what each stage of AFBS-BO buys, against random search and SpargeAttn's grid.

    python -m experiments.stage_ablation            # SmolLM2-135M, all 30 layers, 8K calibration inputs
    python -m experiments.stage_ablation --quick    # the tiny random model's 2 layers on CPU

Every layer gets the `LayerEvaluator` model tuning builds (the config's method and blocks, the AFBS-BO
settings of its tune section, the calibration input and the validation inputs cut from the training
text), and five searches run on it, each after `reset_counters` on a warmed-up evaluator, with the GP's
compilation paid beforehand on a synthetic layer, so every search is timed on equal terms:
  * random: 50 calls, each a uniform s per head at high fidelity on the calibration input; per head the
    sparsest probe with error ≤ ε_high (s = 0, dense-equivalent, if none), then stage 3;
  * stage1: stage 1 (low-fidelity BO); per head the sparsest low-fidelity probe with error ≤ ε_high, then
    stage 3 (a low-fidelity point is not verified, so stage 3 may fall back);
  * stage12: stages 1 and 2; the stage-2 choice is measured on the validation inputs without stage 3's
    fallback, so this row against "afbs" isolates what stage 3 adds;
  * afbs: the full pipeline (`tune_heads`, as `run_tuner(tuner="afbs")` runs it);
  * spargeattn_grid: SpargeAttn's own autotune (`run_tuner(tuner="spargeattn_grid")`).
The AFBS-BO variants warm-start from their own previous layer's s, as `tune_model` does. Fig. 5's
convergence is read from the call histories: after each call, per head, the sparsest point so far with
error ≤ ε_high at high fidelity on the calibration input (low-fidelity calls count as evaluations but
never as feasible), averaged over heads, then over layers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import app
import numpy as np

from afbs_jax import calibration
from afbs_jax.model import iter_layer_qkv
from afbs_jax.tuner import afbs, model_tuning
from afbs_jax.tuner.config import CALIBRATION_INPUT, FIDELITIES, AFBSConfig, TuneResult
from afbs_jax.tuner.evaluator import LayerEvaluator
from afbs_jax.tuner.ledger import CallLedger, latent_ledger, measure_validation, params_at, run_stage3
from afbs_jax.tuner.registry import run_tuner
from experiments import common

RANDOM_EVALS = 50
# The paper's Table III (Llama-2-7B, per layer): evaluations, sparsity, search time.
PAPER = {"random": {"evals": 50, "sparsity": 0.550, "search_time_s": 1.82},
         "stage1": {"evals": 15, "sparsity": 0.682, "search_time_s": 0.51},
         "afbs": {"evals": 19, "sparsity": 0.707, "search_time_s": 0.65}}
CONVERGENCE = ("random", "afbs")  # the two curves of Fig. 5
LEVEL = 0.005  # sparsity differences below half a point are called level in `discuss`


# ------------------------------------------------------------------------------------------ layers


def workload(bench: common.Workbench) -> str:
  """Which model on which corpus, for the reports' comparisons with the paper."""
  return f"{bench.config.model_name} on {bench.config.dataset}"


def tuning_config(bench: common.Workbench) -> AFBSConfig:
  """The AFBS-BO settings model tuning derives from the setting's config (band, budgets, latent map)."""
  return model_tuning.tuning_setup(bench.config.tune).afbs_config


def layer_evaluators(bench: common.Workbench, *, backend: str) -> Iterator[tuple[int, LayerEvaluator]]:
  """(layer, evaluator) for every layer, built as `tune_model` builds them, one layer alive at a time."""
  tune = bench.config.tune
  tokens = calibration.calibration_tokens(bench.tokenizer, bench.corpus.train, num_inputs=1 + tune.num_validation,
                                          length=tune.high_len)
  setup = model_tuning.tuning_setup(tune, backend)
  for layer, q, k, v in iter_layer_qkv(bench.model, tokens):
    yield layer, setup.evaluator(q, k, v)


# ------------------------------------------------------------------------------------------ searches


def running_best(history: Mapping[str, Any], eps_high: float, fidelity: str) -> tuple[np.ndarray, np.ndarray]:
  """After each call, per head: the sparsest point so far with error ≤ ε_high among `fidelity` calls on
  the calibration input.

  Args:
    history: `TuneResult` fields (`vars(result)` or `CallLedger.result_fields()`): history_s,
      history_error, history_sparsity f32 [calls, heads]; call_fidelity, call_input_index [calls].

  Returns:
    (sparsity, s): f32 [calls, heads]; 0 and s = 0 (dense-equivalent) until a head has a feasible point.
  """
  counted = [f == fidelity and i == CALIBRATION_INPUT
             for f, i in zip(history["call_fidelity"], history["call_input_index"])]
  num_heads = np.shape(history["history_s"])[1]
  best_sparsity, best_s = np.zeros(num_heads, np.float32), np.zeros(num_heads, np.float32)
  sparsity_rows, s_rows = [], []
  for call, use in enumerate(counted):
    better = use & (history["history_error"][call] <= eps_high) & (history["history_sparsity"][call] > best_sparsity)
    best_sparsity = np.where(better, history["history_sparsity"][call], best_sparsity)
    best_s = np.where(better, history["history_s"][call], best_s)
    sparsity_rows.append(best_sparsity)
    s_rows.append(best_s)
  empty = np.zeros((0, num_heads), np.float32)
  return (np.stack(sparsity_rows) if sparsity_rows else empty), (np.stack(s_rows) if s_rows else empty)


def _best_s(ledger: CallLedger, config: AFBSConfig, fidelity: str, num_heads: int) -> np.ndarray:
  """f32 [heads]: the sparsest feasible point at `fidelity` so far (s = 0 where there is none)."""
  _, s = running_best(ledger.result_fields(), config.eps_high, fidelity)
  return s[-1] if len(s) else np.zeros(num_heads, np.float32)


def _result(ledger: CallLedger, config: AFBSConfig, s: np.ndarray, error: np.ndarray, sparsity: np.ndarray,
            fallbacks: np.ndarray) -> TuneResult:
  return TuneResult(s=s, params=params_at(config.latent, s), error=error, sparsity=sparsity,
                    num_fallbacks=fallbacks, **ledger.result_fields())


def _validated(ledger: CallLedger, config: AFBSConfig, s: np.ndarray) -> TuneResult:
  return _result(ledger, config, *run_stage3(ledger, config, s))


def _stage1(evaluator: LayerEvaluator, config: AFBSConfig, warm_s: np.ndarray | None):
  """Stage 1 on a fresh ledger: (ledger, posterior mean, std [heads, grid], stage-2 bisection budget)."""
  ledger = latent_ledger(evaluator, evaluator.num_heads, config.cache_repeats)
  bo_iters, binary_iters = config.budgets(warm=warm_s is not None)
  mean, std = afbs.run_stage1(ledger, config, evaluator.num_heads, warm_s, bo_iters)
  return ledger, mean, std, binary_iters


def random_search(evaluator: LayerEvaluator, config: AFBSConfig, warm_s: np.ndarray | None,
                  layer: int) -> TuneResult:
  del warm_s  # random search has no memory of the previous layer
  rng = np.random.default_rng([config.seed, layer])
  ledger = latent_ledger(evaluator, evaluator.num_heads, config.cache_repeats)
  for _ in range(RANDOM_EVALS):
    ledger.query(rng.uniform(size=evaluator.num_heads).astype(np.float32), "high", CALIBRATION_INPUT, stage=1)
  return _validated(ledger, config, _best_s(ledger, config, "high", evaluator.num_heads))


def stage1_only(evaluator: LayerEvaluator, config: AFBSConfig, warm_s: np.ndarray | None,
                layer: int) -> TuneResult:
  del layer
  ledger, _, _, _ = _stage1(evaluator, config, warm_s)
  return _validated(ledger, config, _best_s(ledger, config, "low", evaluator.num_heads))


def stages_1_2(evaluator: LayerEvaluator, config: AFBSConfig, warm_s: np.ndarray | None,
               layer: int) -> TuneResult:
  del layer
  ledger, mean, std, binary_iters = _stage1(evaluator, config, warm_s)
  # The same brackets tune_heads hands stage 2 (afbs.py keeps the helper private; see the report).
  brackets, valid = afbs.stage2_brackets(config, mean, std)  # pylint: disable=protected-access
  s = afbs.run_stage2(ledger, config, brackets, valid, binary_iters)
  error, sparsity = measure_validation(ledger, s, config.num_validation)
  return _result(ledger, config, s, error, sparsity, np.zeros(evaluator.num_heads, np.int32))


def _registered(tuner: str) -> Callable[..., TuneResult]:
  def search(evaluator, config, warm_s, layer):
    del layer
    return run_tuner(evaluator, config, tuner=tuner, warm_start=warm_s)
  return search


@dataclasses.dataclass(frozen=True)
class Method:
  """A row of Table III: its label, its search (evaluator, config, warm s or None, layer) and whether it
  warm-starts from its own previous layer's s."""

  label: str
  search: Callable[[LayerEvaluator, AFBSConfig, np.ndarray | None, int], TuneResult]
  warm_starts: bool


METHODS = {
    "random": Method(f"random search ({RANDOM_EVALS} evals) + stage 3", random_search, False),
    "stage1": Method("stage 1 only (BO) + stage 3", stage1_only, True),
    "stage12": Method("stages 1+2, no fallback", stages_1_2, True),
    "afbs": Method("full AFBS-BO (1+2+3)", _registered("afbs"), True),
    "spargeattn_grid": Method("SpargeAttn grid", _registered("spargeattn_grid"), False),
}


def _compile_tuner(config: AFBSConfig, num_heads: int) -> None:
  """Runs AFBS-BO cold and warm on a synthetic layer, so no timed search pays the GP's compilation."""
  def synthetic(s, fidelity, input_index):
    del fidelity, input_index
    return 0.1 * np.asarray(s), np.asarray(s)
  afbs.tune_heads(synthetic, num_heads, config)
  afbs.tune_heads(synthetic, num_heads, config, warm_start=np.full(num_heads, 0.5, np.float32))


# ------------------------------------------------------------------------------------------ run


def run(setting: common.Setting, *, results_dir: str, work_dir: str, backend: str = "auto",
        model_path: str | None = None) -> dict[str, Any]:
  bench = common.Workbench(setting, work_dir=work_dir, backend=backend, model_path=model_path)
  config = tuning_config(bench)
  _compile_tuner(config, bench.model.config.num_heads)
  layers = {name: [] for name in METHODS}
  curves = {name: [] for name in CONVERGENCE}
  previous = {name: None for name in METHODS}
  for layer, evaluator in layer_evaluators(bench, backend=backend):
    evaluator.warm_up()
    for name, method in METHODS.items():
      evaluator.reset_counters()
      start = time.perf_counter()
      result = method.search(evaluator, config, previous[name] if method.warm_starts else None, layer)
      layers[name].append(_layer_row(layer, result, evaluator, config, time.perf_counter() - start))
      previous[name] = result.s
      if name in curves:
        curves[name].append(running_best(vars(result), config.eps_high, "high")[0].mean(axis=1))
  payload = {"workload": workload(bench), "high_len": int(bench.config.tune.high_len),
             "band": [config.eps_low, config.eps_high], "random_evals": RANDOM_EVALS,
             "methods": {name: {"label": method.label, "warm_starts": method.warm_starts,
                                "summary": _summary(layers[name]), "layers": layers[name]}
                         for name, method in METHODS.items()},
             "convergence": {name: _convergence(curves[name], layers[name]) for name in CONVERGENCE},
             "paper": PAPER}
  markdown = render(payload) + "\n\n" + discuss(payload)
  common.write_results("stage_ablation", payload, markdown, results_dir=results_dir, setting=setting,
                       figure=lambda path: plot(payload, path))
  return payload


def _layer_row(layer: int, result: TuneResult, evaluator: LayerEvaluator, config: AFBSConfig,
               search_time: float) -> dict[str, Any]:
  """One method on one layer: calls, the validated outcome per head, and its cost."""
  error = np.asarray(result.error, np.float32)
  kernel = evaluator.totals()["per_fidelity"]
  return {"layer": layer, "calls": result.num_calls, "calls_low": result.num_calls_low,
          "calls_high": result.num_calls_high,
          "calls_stage": [result.num_calls_stage1, result.num_calls_stage2, result.num_calls_stage3],
          "launches": {f: kernel[f]["launches"] for f in FIDELITIES},
          "kernel_time_s": {f: kernel[f]["wall_time_s"] for f in FIDELITIES},
          "s": result.s, "sparsity": result.sparsity, "error": error,
          "mean_sparsity": float(np.mean(result.sparsity)), "worst_error": float(np.max(error)),
          "mean_error": float(np.mean(error)), "within_eps_high": float(np.mean(error <= config.eps_high)),
          "fallbacks": int(np.sum(result.num_fallbacks)), "search_time_s": search_time}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """A method over every layer: calls summed (and per layer), outcome averaged over layers and heads."""
  total = {key: int(sum(row[key] for row in rows)) for key in ("calls", "calls_low", "calls_high", "fallbacks")}
  per_layer = {f"{key}_per_layer": total[key] / len(rows) for key in ("calls", "calls_low", "calls_high")}
  mean = {key: float(np.mean([row[key] for row in rows])) for key in ("mean_sparsity", "mean_error", "within_eps_high")}
  time_per_layer = float(np.mean([row["search_time_s"] for row in rows]))
  return {**total, **per_layer, **mean, "worst_error": max(row["worst_error"] for row in rows),
          "search_time_s": time_per_layer * len(rows), "search_time_per_layer_s": time_per_layer}


def _convergence(curves: list[np.ndarray], rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-layer best-feasible curves and their mean over layers (a finished layer holds its last value)."""
  length = max(len(curve) for curve in curves)
  padded = np.stack([np.pad(curve, (0, length - len(curve)), mode="edge") for curve in curves])
  return {"mean": padded.mean(axis=0), "per_layer": curves,
          "stage1_calls": [row["calls_stage"][0] for row in rows],
          "final_validated_sparsity": float(np.mean([row["mean_sparsity"] for row in rows]))}


# ------------------------------------------------------------------------------------------ report


def render(payload: dict[str, Any]) -> str:
  """Table III (ours beside the paper's) and a summary of Fig. 5."""
  rows = []
  for name, method in payload["methods"].items():
    summary, paper = method["summary"], payload["paper"].get(name, {})
    rows.append([method["label"], summary["calls_per_layer"], summary["calls_low_per_layer"],
                 summary["calls_high_per_layer"], summary["mean_sparsity"], summary["worst_error"],
                 summary["mean_error"], summary["within_eps_high"], summary["search_time_per_layer_s"],
                 summary["search_time_s"], paper.get("evals"), paper.get("sparsity"), paper.get("search_time_s")])
  table = common.markdown_table(
      ["method", "evals/layer", "low", "high", "sparsity", "worst val. error", "mean val. error", "heads ≤ ε_high",
       "search s/layer", "search s (all layers)", "paper evals", "paper sparsity", "paper search s"], rows)
  curve = common.markdown_table(
      ["method", "best feasible sparsity after 15 / 25 / 50 evals", "final validated sparsity"],
      [[payload["methods"][name]["label"],
        " / ".join(f"{_at(conv['mean'], n):.3f}" for n in (15, 25, 50)), conv["final_validated_sparsity"]]
       for name, conv in payload["convergence"].items()])
  notes = (f"Band {payload['band']}; sparsity is the mean block sparsity over layers and heads on the validation "
           "inputs; evaluations are evaluator calls per layer (each scores every head at once), validation "
           "calls included; search time is wall time per layer on a warmed-up evaluator. Convergence counts "
           "only high-fidelity calls on the calibration input as feasible; low-fidelity calls advance the index.")
  return f"## Table III\n\n{table}\n\n## Fig. 5 (convergence)\n\n{curve}\n\n{notes}"


def _at(curve: list[float] | np.ndarray, evals: int) -> float:
  """The curve after `evals` evaluations (its last value if it is shorter)."""
  return float(curve[min(evals, len(curve)) - 1])


def discuss(payload: dict[str, Any]) -> str:
  """Two to four sentences comparing our ablation with the paper's Table III, from the numbers."""
  summary = {name: method["summary"] for name, method in payload["methods"].items()}
  paper = payload["paper"]
  ours = {name: summary[name]["mean_sparsity"] for name in ("random", "stage1", "stage12", "afbs")}
  lead = ours["afbs"] - ours["random"]
  order = "level with" if abs(lead) < LEVEL else "ahead of" if lead > 0 else "behind"
  paper_lead = paper["afbs"]["sparsity"] - paper["random"]["sparsity"]
  paper_stage2 = paper["afbs"]["sparsity"] - paper["stage1"]["sparsity"]
  sentences = [
      f"The paper's Table III (Llama-2-7B, WikiText-2) has random search at {paper['random']['sparsity']:.1%}, "
      f"stage 1 alone at {paper['stage1']['sparsity']:.1%} and AFBS-BO at {paper['afbs']['sparsity']:.1%} "
      f"with {paper['afbs']['evals']} evaluations; here ({payload['workload']}, {payload['high_len']}-token "
      f"calibration inputs) they reach {ours['random']:.1%}, {ours['stage1']:.1%} and {ours['afbs']:.1%} "
      f"with {summary['afbs']['calls_per_layer']:.1f} evaluations per layer for AFBS-BO, validation included.",
      f"AFBS-BO ends {order} random search ({100 * lead:+.1f} pp), {'as in' if order == 'ahead of' else 'unlike'} "
      f"the paper ({100 * paper_lead:+.1f} pp), and adding stage 2 to stage 1 (both validated) changes the "
      f"sparsity by {100 * (ours['afbs'] - ours['stage1']):+.1f} pp (the paper: {100 * paper_stage2:+.1f} pp).",
      f"Without stage 3's fallback, {summary['stage12']['within_eps_high']:.0%} of heads stay within ε_high on the "
      f"validation inputs (worst error {summary['stage12']['worst_error']:.3f}); with it, "
      f"{summary['afbs']['within_eps_high']:.0%}. Absolute sparsities differ from the paper's because the "
      "achievable block sparsity at a fixed relative-L1 error depends on the model, the text and the context "
      "length (Llama-2-7B at 4K–32K there)."]
  return " ".join(sentences)


def plot(payload: dict[str, Any], path: str) -> None:
  """Fig. 5: mean best feasible sparsity against evaluation index, random search grey, AFBS-BO blue."""
  figure, axes = common.new_figure(size=(7.0, 4.2))
  colors = {"random": "grey", "afbs": "tab:blue"}
  for name, conv in payload["convergence"].items():
    mean = np.asarray(conv["mean"])
    label = payload["methods"][name]["label"]
    axes.step(np.arange(1, mean.size + 1), mean, where="post", color=colors[name], label=label)
    axes.axhline(conv["final_validated_sparsity"], color=colors[name], linestyle=":", linewidth=1.0,
                 label=f"{label}: validated")
  stage1 = float(np.mean(payload["convergence"]["afbs"]["stage1_calls"]))
  axes.axvline(stage1 + 0.5, color="tab:blue", linestyle="--", linewidth=0.8, label="AFBS-BO: stage 1 ends (mean)")
  axes.set_xlabel("evaluation (evaluator call) index")
  axes.set_ylabel("best feasible mean sparsity")
  axes.set_title(f"Convergence, error ≤ ε_high = {payload['band'][1]:g} at high fidelity", fontsize=10)
  axes.legend(fontsize=7)
  common.save_figure(figure, path)


main = common.main_for(run, render, discuss)


if __name__ == "__main__":
  app.run(main)
