"""Synthetic per-head evaluators with known error curves, for tests, docs and overhead measurements.

Two families, both deterministic (the "noise" is a fixed pseudo-random function of the query, so exact
repeats give exact answers):
  * `PowerLawHeads` lives in the latent space: error(s) = scale·s^power per head, optionally with a
    non-monotone wiggle and noise; sparsity(s) = max_sparsity·s. Low fidelity is the same curve evaluated
    at s + low_fidelity_shift (a slightly shifted curve); each validation input scales the error by its own
    factor. `boundary` gives the true answer max{s : error(s) <= ε} on a fine grid.
  * `ParamSpaceHeads` lives in raw (τ, θ, λ) space, for the grid-search baselines: θ forces a fraction of
    blocks dense, τ keeps a fraction of the remaining mass, λ adds a P·V-skip error. `latent_view` turns it
    into a latent evaluator through a `LatentMap`, so AFBS-BO and the baselines can run on the same heads.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from afbs_jax.tuner.latent import LatentMap

_FIDELITY_PHASE = {"low": 0.37, "high": 0.0}


def _as_heads(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
  array = np.asarray(values, np.float64).reshape(-1)
  if array.size == 0 or not np.all(np.isfinite(array)):
    raise ValueError(f"{name} must be a non-empty sequence of finite floats; got {values!r}")
  return array


def _check_query(fidelity: str, input_index: int, num_inputs: int) -> None:
  if fidelity not in _FIDELITY_PHASE:
    raise ValueError(f"fidelity must be 'low' or 'high'; got {fidelity!r}")
  if not 0 <= int(input_index) < num_inputs:
    raise ValueError(f"input_index must lie in [0, {num_inputs}); got {input_index}")


def _pseudo_noise(s: np.ndarray, fidelity: str, input_index: int) -> np.ndarray:
  """A deterministic, rough function of (s, head, fidelity, input) in [-1, 1]."""
  heads = np.arange(s.shape[-1])
  phase = 12.9898 * s * 1e3 + 78.233 * (heads + 1) + 3.7 * input_index + _FIDELITY_PHASE[fidelity]
  return np.sin(phase * 43.7585) * np.cos(phase * 1.618)


@dataclasses.dataclass(frozen=True, eq=False)
class PowerLawHeads:
  """Latent-space heads: error(s) = factor[input]·(scale·s'^power + wiggle·sin(2π·freq·s')) + noise.

  s' = s at high fidelity and min(s + low_fidelity_shift, 1) at low fidelity. The wiggle term is scaled by
  s' so that error(0) = 0 (s = 0 is dense-equivalent). factors[0] is the calibration input, factors[i] the
  i-th validation input.
  """

  scale: Sequence[float]
  power: Sequence[float]
  max_sparsity: float = 0.9
  low_fidelity_shift: float = 0.02
  factors: Sequence[float] = (1.0, 0.99, 0.98, 1.0, 0.97, 0.995)
  wiggle: float = 0.0
  wiggle_freq: float = 3.0
  noise: float = 0.0

  def __post_init__(self):
    scale, power = _as_heads(self.scale, "scale"), _as_heads(self.power, "power")
    if scale.shape != power.shape:
      raise ValueError(f"scale and power need one value per head; got {scale.size} and {power.size}")

  @property
  def num_heads(self) -> int:
    return len(self.scale)

  def error(self, s: np.ndarray, fidelity: str = "high", input_index: int = 0) -> np.ndarray:
    """Error per head at s: [..., heads] → f32 [..., heads]."""
    _check_query(fidelity, input_index, len(self.factors))
    s = np.clip(np.asarray(s, np.float64), 0.0, 1.0)
    shifted = np.minimum(s + self.low_fidelity_shift, 1.0) * (s > 0) if fidelity == "low" else s
    curve = np.asarray(self.scale) * shifted ** np.asarray(self.power)
    curve += self.wiggle * shifted * np.sin(2 * np.pi * self.wiggle_freq * shifted)
    curve += self.noise * (s > 0) * _pseudo_noise(s, fidelity, input_index)
    return np.maximum(self.factors[input_index] * curve, 0.0).astype(np.float32)

  def __call__(self, s, fidelity: str, input_index: int) -> tuple[np.ndarray, np.ndarray]:
    """The `evaluate(s, fidelity, input_index) -> (error, sparsity)` contract of `tune_heads`."""
    s = np.asarray(s, np.float64).reshape(-1)
    if s.shape != (self.num_heads,):
      raise ValueError(f"s must have shape [{self.num_heads}]; got {s.shape}")
    sparsity = (self.max_sparsity * np.clip(s, 0.0, 1.0)).astype(np.float32)
    return self.error(s, fidelity, input_index), sparsity

  def boundary(self, eps_high: float, input_indices: Sequence[int] = (0,), resolution: int = 100_001,
               noiseless: bool = True) -> np.ndarray:
    """max{s : error(s) <= eps_high at high fidelity on every input in input_indices}: f64 [heads]."""
    model = dataclasses.replace(self, noise=0.0) if noiseless else self
    grid = np.linspace(0.0, 1.0, resolution)
    points = np.repeat(grid[:, None], self.num_heads, axis=1)  # [resolution, heads]
    worst = np.max([model.error(points, "high", index) for index in input_indices], axis=0)
    feasible = worst <= eps_high  # s = 0 always is (error(0) = 0)
    return np.array([grid[np.flatnonzero(feasible[:, head])[-1]] for head in range(self.num_heads)])


@dataclasses.dataclass(frozen=True, eq=False)
class ParamSpaceHeads:
  """Raw-parameter heads: block sparsity and error as smooth functions of (τ, θ, λ).

  forced(θ) = clip(θ, 0, 1)^theta_power is the fraction of blocks forced dense (θ < 0: none, θ >= 1: all);
  kept(τ) = clip(τ, 0, 1)^tau_power the fraction of the rest kept; block sparsity = (1 − forced)(1 − kept);
  error = factor[input]·fidelity_factor·(scale·sparsity^power + pv_scale·sigmoid((λ − pv_mid)/pv_width)).
  """

  scale: Sequence[float]
  power: Sequence[float]
  tau_power: float = 6.0
  theta_power: float = 0.5
  pv_scale: float = 0.01
  pv_mid: float = -6.0
  pv_width: float = 1.5
  low_fidelity_factor: float = 1.05
  factors: Sequence[float] = (1.0, 0.99, 0.98, 1.0, 0.97, 0.995)

  @property
  def num_heads(self) -> int:
    return len(self.scale)

  def evaluate_params(self, params, fidelity: str, input_index: int):
    """(error, sparsity), f32 [heads] each, at params {"tau", "theta", "lam"}: [heads] (λ in ln units)."""
    _check_query(fidelity, input_index, len(self.factors))
    tau, theta, lam = (np.asarray(params[name], np.float64).reshape(-1) for name in ("tau", "theta", "lam"))
    forced = np.clip(theta, 0.0, 1.0) ** self.theta_power
    kept = np.clip(tau, 0.0, 1.0) ** self.tau_power
    sparsity = (1.0 - forced) * (1.0 - kept)
    pv_error = self.pv_scale / (1.0 + np.exp(-(lam - self.pv_mid) / self.pv_width))
    error = np.asarray(self.scale) * sparsity ** np.asarray(self.power) + pv_error
    error *= self.factors[input_index] * (self.low_fidelity_factor if fidelity == "low" else 1.0)
    return error.astype(np.float32), sparsity.astype(np.float32)

  def latent_view(self, latent: LatentMap):
    """evaluate(s, fidelity, input_index) for `tune_heads`, through the latent map."""
    def evaluate(s, fidelity, input_index):
      return self.evaluate_params(latent.param_dict(np.asarray(s, np.float32)), fidelity, input_index)
    return evaluate


def random_power_law_heads(num_heads: int, seed: int = 0, **kwargs) -> PowerLawHeads:
  """PowerLawHeads with scale ~ U(0.02, 1) and power ~ U(1, 5): boundaries spread over (0, 1]."""
  rng = np.random.default_rng(seed)
  return PowerLawHeads(scale=rng.uniform(0.02, 1.0, num_heads), power=rng.uniform(1.0, 5.0, num_heads),
                       **kwargs)


def measure_overhead(num_heads: int = 32, repeats: int = 10, seed: int = 0) -> dict:
  """Wall time of `tune_heads` on a synthetic evaluator, i.e. the tuner's own overhead (GP, acquisition,
  bookkeeping); the evaluator is a few numpy operations. The first run (jit compilation) is reported
  separately from the steady-state median and minimum over `repeats` runs (the minimum is the least
  disturbed by other load on the machine)."""
  import time  # pylint: disable=g-import-not-at-top
  from afbs_jax.tuner.afbs import tune_heads  # pylint: disable=g-import-not-at-top
  from afbs_jax.tuner.config import AFBSConfig  # pylint: disable=g-import-not-at-top
  heads = random_power_law_heads(num_heads, seed, wiggle=0.01, wiggle_freq=4.0, noise=0.002)
  evaluator_seconds = [0.0]

  def timed_evaluate(s, fidelity, input_index):
    start = time.perf_counter()
    answer = heads(s, fidelity, input_index)
    evaluator_seconds[0] += time.perf_counter() - start
    return answer

  report = {"num_heads": num_heads}
  for mode in ("band", "paper"):
    config = AFBSConfig(acquisition=mode)
    walls, result = [], None
    for _ in range(repeats + 1):
      evaluator_seconds[0] = 0.0
      start = time.perf_counter()
      result = tune_heads(timed_evaluate, num_heads, config)
      walls.append(time.perf_counter() - start - evaluator_seconds[0])
    truth = heads.boundary(config.eps_high, input_indices=range(len(heads.factors)))
    report[mode] = {"first_run_s": round(walls[0], 3),
                    "steady_median_s": round(float(np.median(walls[1:])), 3),
                    "steady_min_s": round(float(np.min(walls[1:])), 3), "num_calls": result.num_calls,
                    "calls_low_high": [result.num_calls_low, result.num_calls_high],
                    "max_gap_to_boundary": round(float(np.max(truth - result.s)), 4),
                    "max_validated_error": round(float(result.error.max()), 4)}
  return report


if __name__ == "__main__":
  # python -m afbs_jax.tuner.synthetic [results/tuner_overhead.json]: prints the report, optionally saves it.
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.devices()[0].platform}, "
             f"jax {jax.__version__}")
  text = json.dumps({"machine": machine, **measure_overhead()}, indent=2)
  print(text)
  if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as report_file:
      report_file.write(text + "\n")
