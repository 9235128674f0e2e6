"""What every tuner shares: the lock-step call ledger and stage-3 validation on the held-out inputs.

`CallLedger` makes evaluator calls for all heads at once, answers exact repeats from a cache, and counts
and records every call (per fidelity, per stage), which is how AFBS-BO and the grid baselines are
compared on equal terms. `run_stage3` validates a setting on the validation inputs with the fallback
s ← factor·s; `measure_validation` only measures (SpargeAttn's own autotune has no fallback). Inputs are
indexed as in the evaluator: `CALIBRATION_INPUT` (0) and the validation inputs 1..num_validation.
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from afbs_jax.tuner.config import CALIBRATION_INPUT, FIDELITIES, AFBSConfig

# evaluate(s: f32 [heads], fidelity: "low" | "high", input_index: int) -> (error, sparsity), f32 [heads].
Evaluate = Callable[[jnp.ndarray, str, int], tuple[jnp.ndarray, jnp.ndarray]]


def validation_inputs(num_validation: int) -> range:
  """The input indices of the validation inputs."""
  return range(CALIBRATION_INPUT + 1, CALIBRATION_INPUT + 1 + num_validation)


class CallLedger:
  """Makes lock-step evaluator calls, caches exact repeats per head, and counts and records every call.

  Points are f32 [heads, knobs] (knobs = 1 for the latent s, 3 for raw (τ, θ, λ)); `invoke(points,
  fidelity, input_index)` evaluates all heads at once.
  """

  def __init__(self, invoke: Callable[[np.ndarray, str, int], tuple], num_heads: int, cache_repeats: bool):
    self._invoke = invoke
    self._num_heads = num_heads
    self._cache_repeats = cache_repeats
    self._cache: list[dict] = [{} for _ in range(num_heads)]
    self.calls_per_fidelity = {fidelity: 0 for fidelity in FIDELITIES}
    self.calls_per_stage = {1: 0, 2: 0, 3: 0}
    self.history_points: list[np.ndarray] = []
    self.history_error: list[np.ndarray] = []
    self.history_sparsity: list[np.ndarray] = []
    self.call_fidelity: list[str] = []
    self.call_input_index: list[int] = []
    self.call_stage: list[int] = []

  @property
  def num_calls(self) -> int:
    return len(self.call_stage)

  def query(self, points: np.ndarray, fidelity: str, input_index: int, stage: int,
            needed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Answers (error, sparsity, fresh) for every head; `fresh` marks answers from a new call.

    Args:
      points: f32 [heads] or [heads, knobs]. fidelity: "low" | "high". input_index: which input.
      stage: 1..3, for the counters. needed: bool [heads], heads whose answer matters (default all).
        Heads that are not needed and not cached get NaN.
    """
    if fidelity not in FIDELITIES:
      raise ValueError(f"fidelity must be one of {FIDELITIES}; got {fidelity!r}")
    points = np.asarray(points, np.float32).reshape(self._num_heads, -1)
    needed = np.ones(self._num_heads, bool) if needed is None else np.asarray(needed, bool)
    keys = [(fidelity, int(input_index), *points[head].tolist()) for head in range(self._num_heads)]
    cached = [self._cache[head].get(keys[head]) if self._cache_repeats else None
              for head in range(self._num_heads)]
    fresh = np.zeros(self._num_heads, bool)
    if any(needed[head] and cached[head] is None for head in range(self._num_heads)):
      error, sparsity = self._call(points, fidelity, input_index, stage)
      fresh = np.array([pair is None for pair in cached])
      cached = [pair if pair is not None else (error[head], sparsity[head]) for head, pair in enumerate(cached)]
      if self._cache_repeats:
        for head in range(self._num_heads):
          self._cache[head].setdefault(keys[head], cached[head])
    answers = np.array([pair if pair is not None else (np.nan, np.nan) for pair in cached], np.float32)
    return answers[:, 0], answers[:, 1], fresh & needed

  def _call(self, points, fidelity, input_index, stage):
    error, sparsity = self._invoke(points, fidelity, input_index)
    error = np.asarray(error, np.float32).reshape(-1)
    sparsity = np.asarray(sparsity, np.float32).reshape(-1)
    for name, values in (("error", error), ("sparsity", sparsity)):
      if values.shape != (self._num_heads,):
        raise ValueError(f"evaluate must return {name} of shape [{self._num_heads}]; got {values.shape}")
      if not np.all(np.isfinite(values)):
        raise ValueError(f"evaluate returned a non-finite {name} at fidelity={fidelity!r}, "
                         f"input_index={input_index}: {values}")
    self.calls_per_fidelity[fidelity] += 1
    self.calls_per_stage[stage] += 1
    self.history_points.append(points.copy())
    self.history_error.append(error)
    self.history_sparsity.append(sparsity)
    self.call_fidelity.append(fidelity)
    self.call_input_index.append(int(input_index))
    self.call_stage.append(stage)
    return error, sparsity

  def result_fields(self) -> dict:
    """The call-accounting fields of `TuneResult`; history_s holds the first knob of each point."""
    def stack(rows):
      return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self._num_heads), np.float32)
    points = stack([row[:, 0] for row in self.history_points])
    return dict(num_calls=self.num_calls, num_calls_low=self.calls_per_fidelity["low"],
                num_calls_high=self.calls_per_fidelity["high"], num_calls_stage1=self.calls_per_stage[1],
                num_calls_stage2=self.calls_per_stage[2], num_calls_stage3=self.calls_per_stage[3],
                history_s=points, history_error=stack(self.history_error),
                history_sparsity=stack(self.history_sparsity), call_fidelity=tuple(self.call_fidelity),
                call_input_index=tuple(self.call_input_index), call_stage=tuple(self.call_stage))


def latent_ledger(evaluate: Evaluate, num_heads: int, cache_repeats: bool) -> CallLedger:
  """A ledger whose points are the latent s (one knob per head)."""
  def invoke(points, fidelity, input_index):
    return evaluate(jnp.asarray(points[:, 0], jnp.float32), fidelity, input_index)
  return CallLedger(invoke, num_heads, cache_repeats)


def params_at(latent: Any, s: np.ndarray) -> dict[str, np.ndarray]:
  """The method parameters of latent s: {name: f32 [heads]} as numpy."""
  return {name: np.asarray(value, np.float32) for name, value in latent.param_dict(s).items()}


def measure_validation(ledger: CallLedger, points: np.ndarray, num_validation: int):
  """Worst error and mean sparsity over every validation input, no fallback: f32 [heads] each."""
  worst = np.zeros(points.shape[0], np.float32)
  sparsity = np.zeros(points.shape[0], np.float32)
  for input_index in validation_inputs(num_validation):
    error, probe_sparsity, _ = ledger.query(points, "high", input_index, stage=3)
    worst, sparsity = np.maximum(worst, error), sparsity + probe_sparsity / num_validation
  return worst, sparsity


def _validate(ledger: CallLedger, config: AFBSConfig, s: np.ndarray, pending: np.ndarray):
  """Worst error and mean sparsity over the validation inputs for the pending heads: f32 [heads] each.

  Stops early once every pending head has already failed, since more inputs cannot make it pass.
  """
  worst = np.zeros(s.shape[0], np.float32)
  sparsity_sum = np.zeros(s.shape[0], np.float32)
  for input_index in validation_inputs(config.num_validation):
    error, sparsity, _ = ledger.query(s, "high", input_index, stage=3, needed=pending)
    worst = np.where(pending, np.maximum(worst, error), worst)
    sparsity_sum += np.where(pending, sparsity, 0.0)
    if not np.any(pending & (worst <= config.eps_high)):
      break
  return worst, sparsity_sum / config.num_validation


def run_stage3(ledger: CallLedger, config: AFBSConfig, s_best: np.ndarray):
  """Multi-input validation with fallback. Returns (s, error, sparsity, num_fallbacks), [heads] each."""
  num_heads = s_best.shape[0]
  s = s_best.astype(np.float32).copy()
  fallbacks = np.zeros(num_heads, np.int32)
  error = np.zeros(num_heads, np.float32)
  sparsity = np.zeros(num_heads, np.float32)
  pending = np.ones(num_heads, bool)
  max_rounds = 2 if config.acquisition == "paper" else config.max_fallbacks + 2
  for round_index in range(max_rounds):
    worst, mean_sparsity = _validate(ledger, config, s, pending)
    error = np.where(pending, worst, error)
    sparsity = np.where(pending, mean_sparsity, sparsity)
    pending &= worst > config.eps_high
    # Paper mode's second round only re-measures the setting after its single fallback, for the report.
    remeasured = config.acquisition == "paper" and round_index == 1
    if remeasured or not np.any(pending):
      break
    to_dense = config.acquisition == "band" and round_index >= config.max_fallbacks
    s = np.where(pending, 0.0 if to_dense else config.fallback_factor * s, s).astype(np.float32)
    fallbacks += pending
  return s, error, sparsity, fallbacks
