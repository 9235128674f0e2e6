"""Configuration (`AFBSConfig`) and result (`TuneResult`) of the AFBS-BO per-head tuner.

`AFBSConfig` holds every knob of the three stages (error band, acquisition mode, budgets, GP settings,
fallback policy) and validates them on construction, so a bad value fails with a clear message before any
evaluation runs. `TuneResult` is what `tune_heads` (and the grid-search baselines) return: the tuned latent s
and kernel thresholds per head, the validated worst-case error and sparsity at them, and an exact account of
the evaluator calls (per fidelity, per stage, and the full call history).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from afbs_jax.attention.latent import LatentMap

# The registries every tuner, the evaluator and the command line share.
Acquisition = Literal["band", "paper"]
ACQUISITIONS = ("band", "paper")
# Low fidelity: a prefix of each input (stage 1); high: the full captured length (stages 2 and 3).
FIDELITIES = ("low", "high")
CALIBRATION_INPUT = 0  # inputs 1..num_validation are the validation inputs
MIN_GRID_SIZE = 257


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class AFBSConfig:
  """Settings of AFBS-BO. Defaults follow the paper (Algorithm 1) unless noted.

  Attributes:
    eps_low, eps_high: the error band [ε_low, ε_high] on relative L1 error; 0 <= eps_low <= eps_high.
      In band mode ε_high is the constraint and ε_low never rejects a setting that is both sparser and
      more accurate; in paper mode stage 2 keeps only in-band probes (Algorithm 1, line 25).
    acquisition: "band" (default; constrained search for the largest s with error <= ε_high, with the
      paper's holes fixed) or "paper" (EI on error, Eq. 5, and Algorithm 1 exactly as written).
    latent: the s → per-head parameters map of the method being tuned (anything with `param_dict(s)`;
      SpargeAttn's `LatentMap` by default).
    bo_init: stage-1 initial points (cold start).
    bo_iters: stage-1 BO iterations after the initial points (cold start).
    binary_iters: stage-2 bisection steps per region (cold start).
    warm_bo_iters, warm_binary_iters: the reduced budgets under warm start. The paper quotes "8 BO
      iterations (vs. 15)", i.e. 8 low-fidelity calls in all: 3 initial points + 5 iterations.
    warm_offsets: warm-start initial points are prev_s + offset (clipped to [0, 1]).
    num_regions: how many promising regions stage 2 refines.
    num_validation: stage-3 validation inputs (indices 1..num_validation; 0 is the calibration input).
    grid_size: the dense s-grid on which the acquisition is maximised (>= 257).
    length_scale: Matérn-5/2 length scale (fixed, the paper's 0.2).
    noise: observation noise variance relative to the data variance (the GP works on standardised
      errors); keeps the posterior well conditioned with duplicate points.
    amplitude_floor: lower bound on the GP amplitude (absolute error units), used when all errors are equal.
    ucb_beta: β of UCB(s) = μ(s) + β·σ(s) in the region extraction.
    fallback_factor: stage-3 fallback s ← fallback_factor·s.
    max_fallbacks: band mode: at most this many fallbacks, then s = 0 (dense-equivalent, always passes).
    cache_repeats: reuse results of exact repeats (same s, fidelity, input) instead of calling again.
    seed: reserved for stochastic variants; the current algorithm is deterministic.
  """

  eps_low: float = 0.045
  eps_high: float = 0.055
  acquisition: Acquisition = "band"
  latent: Any = dataclasses.field(default_factory=LatentMap)
  bo_init: tuple[float, ...] = (0.2, 0.5, 0.8)
  bo_iters: int = 12
  binary_iters: int = 4
  warm_bo_iters: int = 5
  warm_binary_iters: int = 3
  warm_offsets: tuple[float, ...] = (-0.1, 0.0, 0.1)
  num_regions: int = 2
  num_validation: int = 5
  grid_size: int = MIN_GRID_SIZE
  length_scale: float = 0.2
  noise: float = 1e-4
  amplitude_floor: float = 1e-3
  ucb_beta: float = 2.0
  fallback_factor: float = 0.9
  max_fallbacks: int = 10
  cache_repeats: bool = True
  seed: int = 0

  def __post_init__(self):
    finite_band = np.isfinite(self.eps_low) and np.isfinite(self.eps_high)
    _require(finite_band and 0.0 <= self.eps_low <= self.eps_high,
             f"AFBSConfig needs 0 <= eps_low <= eps_high; got eps_low={self.eps_low}, "
             f"eps_high={self.eps_high}")
    _require(self.acquisition in ACQUISITIONS,
             f"AFBSConfig.acquisition must be one of {ACQUISITIONS}; got {self.acquisition!r}")
    _require(callable(getattr(self.latent, "param_dict", None)) and dataclasses.is_dataclass(self.latent),
             f"AFBSConfig.latent must be a latent-map dataclass with param_dict(s) (e.g. LatentMap); got "
             f"{type(self.latent).__name__}")
    for name in ("bo_init", "warm_offsets"):
      points = getattr(self, name)
      _require(len(points) >= 1 and all(np.isfinite(p) for p in points),
               f"AFBSConfig.{name} must be a non-empty tuple of finite floats; got {points!r}")
    _require(all(0.0 <= p <= 1.0 for p in self.bo_init),
             f"AFBSConfig.bo_init points must lie in [0, 1]; got {self.bo_init!r}")
    for name in ("bo_iters", "binary_iters", "warm_bo_iters", "warm_binary_iters", "max_fallbacks"):
      value = getattr(self, name)
      _require(isinstance(value, int) and 0 <= value <= 1000,
               f"AFBSConfig.{name} must be an int in [0, 1000]; got {value!r}")
    for name in ("num_regions", "num_validation"):
      value = getattr(self, name)
      _require(isinstance(value, int) and value >= 1, f"AFBSConfig.{name} must be an int >= 1; got {value!r}")
    _require(isinstance(self.grid_size, int) and self.grid_size >= MIN_GRID_SIZE,
             f"AFBSConfig.grid_size must be an int >= {MIN_GRID_SIZE}; got {self.grid_size!r}")
    for name in ("length_scale", "noise", "amplitude_floor"):
      value = getattr(self, name)
      _require(np.isfinite(value) and value > 0, f"AFBSConfig.{name} must be > 0; got {value!r}")
    _require(np.isfinite(self.ucb_beta) and self.ucb_beta >= 0,
             f"AFBSConfig.ucb_beta must be >= 0; got {self.ucb_beta!r}")
    _require(0.0 < self.fallback_factor < 1.0,
             f"AFBSConfig.fallback_factor must lie in (0, 1); got {self.fallback_factor!r}")

  def budgets(self, warm: bool) -> tuple[int, int]:
    """Returns (bo_iters, binary_iters) for a cold or a warm start."""
    return (self.warm_bo_iters, self.warm_binary_iters) if warm else (self.bo_iters, self.binary_iters)


@dataclasses.dataclass(frozen=True, eq=False)
class TuneResult:
  """Outcome of tuning one layer's heads. Arrays are numpy, f32 [heads] unless noted.

  Attributes:
    s: tuned latent per head (NaN for baselines that search raw (τ, θ, λ) directly).
    params: {name: f32 [heads]}, the method's parameters to deploy (SpargeAttn: tau, theta, lam, which
      are also readable as attributes, `result.tau`).
    error: worst relative L1 error over the validation inputs at the final setting.
    sparsity: block sparsity at the final setting (worst, i.e. lowest, over the validation inputs).
    num_calls: evaluator calls in all (each call evaluates every head at once).
    num_calls_low, num_calls_high: calls per fidelity.
    num_calls_stage1, num_calls_stage2, num_calls_stage3: calls per stage (search / refine / validate;
      the baselines report their search as stage 1 and their refinement, if any, as stage 2).
    num_fallbacks: int32 [heads], stage-3 fallbacks applied per head.
    history_s, history_error, history_sparsity: f32 [num_calls, heads], every call's inputs and outputs
      (for baselines history_s holds τ, the first raw knob).
    call_fidelity: "low" | "high" per call; call_input_index: input index per call; call_stage: 1..3.
  """

  s: np.ndarray
  params: Mapping[str, np.ndarray]
  error: np.ndarray
  sparsity: np.ndarray
  num_calls: int
  num_calls_low: int
  num_calls_high: int
  num_calls_stage1: int
  num_calls_stage2: int
  num_calls_stage3: int
  num_fallbacks: np.ndarray
  history_s: np.ndarray
  history_error: np.ndarray
  history_sparsity: np.ndarray
  call_fidelity: tuple[str, ...]
  call_input_index: tuple[int, ...]
  call_stage: tuple[int, ...]

  @property
  def num_heads(self) -> int:
    return int(self.s.shape[0])

  def __getattr__(self, name: str) -> np.ndarray:
    # Only reached when normal lookup fails: parameter names read as attributes (result.tau).
    params = self.__dict__.get("params", {})
    if name in params:
      return params[name]
    raise AttributeError(f"{type(self).__name__} has no attribute or parameter {name!r}")
