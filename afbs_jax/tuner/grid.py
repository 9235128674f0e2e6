"""Grid-search tuners that AFBS-BO is compared against, with the same call accounting.

* `spargeattn_grid` reproduces SpargeAttn's own autotune (`spas_sage_attn/autotune.py`) in raw (τ, θ, λ)
  space: θ over k/16, k = −16..15, stopping after the first θ whose sparsity falls below 0.1; per θ a
  bisection on τ ∈ [0, 1] from 0.1 down to width <= 0.001 (an error below `l1` moves the interval down,
  toward sparser), then a bisection on pvthreshd ∈ [0, 50] from 20 down to width <= 0.1 (an error below
  `pv_l1` moves it down), converted to our λ = −pvthreshd·ln 2 (pvthreshd is in log2 units); the winner is
  the θ bucket of width 0.125 with the largest summed sparsity, and the final τ, θ, λ are the maxima (the
  most conservative values) over that bucket; a head whose winning bucket averages <= 0.1 sparsity is
  made dense (τ = θ = 1). SpargeAttn's targets are (l1, pv_l1) with pv_l1 > l1; to aim at our band we take
  l1 = the band centre (0.05) and pv_l1 = ε_high (0.055) by default. Its calibration runs at high fidelity
  on the calibration input; the result is then measured on the validation inputs (no fallback, as in the
  source). By default exact repeats are *not* cached, so the call count is what SpargeAttn itself spends
  (its 16 negative θ values all mean "filter off" and repeat the same work).
* `s_grid` is a plain grid on the latent s at spacing 0.05 at high fidelity: the largest s with error
  <= ε_high, then stage-3 validation exactly as `tune_heads` does it.
Heads move in lock-step: one evaluator call covers every head.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from afbs_jax.tuner.config import CALIBRATION_INPUT, AFBSConfig, TuneResult
from afbs_jax.tuner.ledger import CallLedger, Evaluate, latent_ledger, measure_validation, params_at, run_stage3

# evaluate_params({"tau", "theta", "lam"}: f32 [heads] each, fidelity, input_index) -> (error, sparsity).
EvaluateParams = Callable[..., tuple[jnp.ndarray, jnp.ndarray]]

THETA_GRID = tuple(k / 16 for k in range(-16, 16))
THETA_BUCKET_WIDTH = 0.125
MIN_SPARSITY = 0.1
TAU_START, TAU_WIDTH = 0.1, 0.001
PV_START, PV_HIGH, PV_WIDTH = 20.0, 50.0, 0.1
LN2 = math.log(2.0)


def pvthreshd_to_lam(pvthreshd: np.ndarray) -> np.ndarray:
  """SpargeAttn's pvthreshd (log2 units, > 0) → our λ (natural-log units, <= 0)."""
  return (-np.asarray(pvthreshd, np.float64) * LN2).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SpargeGridConfig:
  """Targets and accounting of `spargeattn_grid` (see the module docstring for the mapping)."""

  l1: float = 0.05
  pv_l1: float = 0.055
  eps_high: float = 0.055
  tune_pv: bool = True
  num_validation: int = 5
  cache_repeats: bool = False

  def __post_init__(self):
    if not 0.0 < self.l1 < self.pv_l1:
      raise ValueError(f"SpargeGridConfig needs 0 < l1 < pv_l1 (as SpargeAttn asserts); got l1={self.l1}, "
                       f"pv_l1={self.pv_l1}")
    if self.num_validation < 1:
      raise ValueError(f"SpargeGridConfig.num_validation must be >= 1; got {self.num_validation}")


def _bisect(ledger: CallLedger, make_points: Callable[[np.ndarray], np.ndarray], active: np.ndarray,
            start: float, high: float, width: float, target: float):
  """SpargeAttn's bisection, per head in lock-step: pass (error < target) moves the interval down.

  Returns (final midpoint, sparsity at the last probe): f32 [heads] each.
  """
  num_heads = active.shape[0]
  low_end = np.zeros(num_heads)
  high_end = np.full(num_heads, high)
  mid = np.full(num_heads, start)
  sparsity = np.zeros(num_heads, np.float32)
  running = active.copy()
  while np.any(running):
    error, probe_sparsity, _ = ledger.query(make_points(mid), "high", CALIBRATION_INPUT, stage=1,
                                            needed=running)
    sparsity = np.where(running, probe_sparsity, sparsity)
    passed = error < target
    high_end = np.where(running & passed, mid, high_end)
    low_end = np.where(running & ~passed, mid, low_end)
    mid = np.where(running, (low_end + high_end) / 2, mid)
    running &= (high_end - low_end) > width
  return mid.astype(np.float32), sparsity


def _pick_bucket(points: list[list[tuple[float, float, float, float]]]):
  """Per head: the θ bucket with the largest summed sparsity → (τ, θ, pvthreshd maxima, mean sparsity)."""
  chosen = []
  for head_points in points:
    buckets: dict[int, list] = {}
    for point in head_points:
      buckets.setdefault(math.floor((point[1] + 1.0) / THETA_BUCKET_WIDTH + 1e-9), []).append(point)
    ordered = sorted(buckets.values(), key=lambda bucket: -sum(p[3] for p in bucket))  # stable: ties → first
    best = np.asarray(ordered[0])
    chosen.append((best[:, 0].max(), best[:, 1].max(), best[:, 2].max(), best[:, 3].mean()))
  return np.asarray(chosen, np.float64).T


def spargeattn_grid(evaluate_params: EvaluateParams, num_heads: int,
                    config: SpargeGridConfig = SpargeGridConfig()) -> TuneResult:
  """SpargeAttn's autotune on `evaluate_params({"tau", "theta", "lam"}, fidelity, input_index)`; s is NaN."""
  def invoke(points, fidelity, input_index):
    params = {name: jnp.asarray(points[:, i]) for i, name in enumerate(("tau", "theta", "lam"))}
    return evaluate_params(params, fidelity, input_index)
  ledger = CallLedger(invoke, num_heads, config.cache_repeats)
  points: list[list] = [[] for _ in range(num_heads)]
  active = np.ones(num_heads, bool)
  lam_start = pvthreshd_to_lam(np.full(num_heads, PV_START))
  for theta_value in THETA_GRID:
    theta = np.full(num_heads, theta_value, np.float32)
    tau, sparsity = _bisect(ledger, lambda t: np.stack([t, theta, lam_start], 1), active, TAU_START, 1.0,
                            TAU_WIDTH, config.l1)
    tau = np.where(tau > 0.999, 1.0, tau).astype(np.float32)
    pvthreshd = np.full(num_heads, PV_START, np.float32)
    if config.tune_pv:
      pvthreshd, _ = _bisect(ledger, lambda p: np.stack([tau, theta, pvthreshd_to_lam(p)], 1), active,
                             PV_START, PV_HIGH, PV_WIDTH, config.pv_l1)
    for head in np.flatnonzero(active):
      points[head].append((tau[head], theta_value, pvthreshd[head], sparsity[head]))
    active &= sparsity >= MIN_SPARSITY  # SpargeAttn records the point, then stops
    if not np.any(active):
      break
  tau, theta, pvthreshd, mean_sparsity = _pick_bucket(points)
  dense = mean_sparsity <= MIN_SPARSITY
  tau, theta = np.where(dense, 1.0, tau), np.where(dense, 1.0, theta)
  final = np.stack([tau, theta, pvthreshd_to_lam(pvthreshd)], 1).astype(np.float32)
  error, sparsity = measure_validation(ledger, final, config.num_validation)
  params = {"tau": final[:, 0], "theta": final[:, 1], "lam": final[:, 2]}
  return TuneResult(s=np.full(num_heads, np.nan, np.float32), params=params, error=error, sparsity=sparsity,
                    num_fallbacks=np.zeros(num_heads, np.int32), **ledger.result_fields())


def s_grid(evaluate: Evaluate, num_heads: int, config: AFBSConfig = AFBSConfig(),
           spacing: float = 0.05) -> TuneResult:
  """Plain latent grid s = 0, spacing, ..., 1 at high fidelity; largest s with error <= ε_high; stage 3."""
  if not 0.0 < spacing <= 1.0:
    raise ValueError(f"spacing must lie in (0, 1]; got {spacing!r}")
  ledger = latent_ledger(evaluate, num_heads, config.cache_repeats)
  best = np.zeros(num_heads, np.float32)
  for value in np.linspace(0.0, 1.0, int(round(1.0 / spacing)) + 1, dtype=np.float32):
    error, _, _ = ledger.query(np.full(num_heads, value), "high", CALIBRATION_INPUT, stage=1)
    best = np.where(error <= config.eps_high, np.maximum(best, value), best)
  band_config = dataclasses.replace(config, acquisition="band")  # repeat the fallback until it validates
  s, error, sparsity, fallbacks = run_stage3(ledger, band_config, best)
  return TuneResult(s=s, params=params_at(config.latent, s), error=error, sparsity=sparsity,
                    num_fallbacks=fallbacks, **ledger.result_fields())
