"""AFBS-BO per head: stage 1 (low-fidelity BO), stage 2 (high-fidelity bisection), stage 3 (validation).

`tune_heads` tunes every head of one attention layer at once. All heads move in lock-step: each call of the
user's `evaluate(s, fidelity, input_index)` passes one s per head and returns one (error, sparsity) per
head, so a call costs the same whether one head or all heads need it. A head that has nothing new to ask
re-sends a point it already asked, and `CallLedger` answers exact repeats (same s, fidelity, input) from its
cache: a call is made only when some head that needs an answer misses the cache.

Two modes (`AFBSConfig.acquisition`):
  * "paper" reproduces Algorithm 1 as written: EI on error (Eq. 5), regions ranked by lowest UCB, bisection
    inside each region keeping only in-band probes (line 25), one validation pass and a single fallback
    s ← 0.9·s. After a fallback the final setting is measured once more on the validation inputs, only so
    that `TuneResult.error` reports the setting actually returned. Minimising error alone drifts toward
    s → 0 (dense attention has zero error), so the lowest-UCB regions sit near s = 0, their probes mostly
    fall below ε_low, and line 25 then leaves many heads at s = 0 (dense).
  * "band" (default) seeks the largest s with error <= ε_high and fixes the paper's holes: the acquisition
    is the constrained EI of `gp.py`; bisection runs on a bracket around the feasibility boundary; stage 2
    keeps the sparsest probe with error <= ε_high seen at high fidelity, in the band or not (ε_low never
    rejects a probe that is both sparser and more accurate; it only matters in paper mode), so a head
    whose error stays below ε_low even at s = 1 keeps the most aggressive s that validates (line 25 would
    leave it at s = 0); the second region's budget goes to heads whose top bracket had no feasible probe
    (low fidelity was too optimistic: they bisect [0, lowest failed probe]); and the fallback repeats
    until validation passes (at most `max_fallbacks` times, then s = 0, which is dense-equivalent and
    always passes).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from afbs_jax.tuner import gp
from afbs_jax.tuner.config import CALIBRATION_INPUT, FIDELITIES, AFBSConfig, TuneResult
from afbs_jax.tuner.ledger import CallLedger, Evaluate, latent_ledger, params_at, run_stage3

__all__ = ["CALIBRATION_INPUT", "FIDELITIES", "CallLedger", "Evaluate", "run_stage1", "run_stage2",
           "run_stage3", "stage2_brackets", "tune_heads"]


# ------------------------------------------------------------------------------------------------ stage 1


def _initial_points(config: AFBSConfig, num_heads: int, warm_s: np.ndarray | None) -> np.ndarray:
  """f32 [num_points, heads]: cold start the shared `bo_init`, warm start prev_s + `warm_offsets`."""
  if warm_s is None:
    return np.tile(np.asarray(config.bo_init, np.float32)[:, None], (1, num_heads))
  offsets = np.asarray(config.warm_offsets, np.float32)[:, None]
  return np.clip(warm_s[None, :] + offsets, 0.0, 1.0).astype(np.float32)


def run_stage1(ledger: CallLedger, config: AFBSConfig, num_heads: int, warm_s: np.ndarray | None,
               bo_iters: int) -> tuple[np.ndarray, np.ndarray]:
  """Low-fidelity BO on the calibration input. Returns the GP posterior (mean, std): f32 [heads, grid]."""
  init = _initial_points(config, num_heads, warm_s)
  capacity = init.shape[0] + bo_iters
  x = np.zeros((num_heads, capacity), np.float32)
  y = np.zeros((num_heads, capacity), np.float32)
  mask = np.zeros((num_heads, capacity), bool)
  filled = np.zeros(num_heads, np.int32)
  heads = np.arange(num_heads)

  def observe(s):
    error, _, fresh = ledger.query(s, "low", CALIBRATION_INPUT, stage=1)
    slots = filled[fresh]
    x[heads[fresh], slots], y[heads[fresh], slots], mask[heads[fresh], slots] = s[fresh], error[fresh], True
    filled[fresh] += 1

  grid = gp.make_grid(config.grid_size)
  step = lambda: gp.acquisition_step(
      jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), grid, mode=config.acquisition,
      eps_high=config.eps_high, length_scale=config.length_scale, noise=config.noise,
      amplitude_floor=config.amplitude_floor)
  for s in init:
    observe(s)
  for _ in range(bo_iters):
    next_s, _, _ = step()
    observe(np.asarray(next_s, np.float32))
  _, mean, std = step()
  return np.asarray(mean), np.asarray(std)


# ------------------------------------------------------------------------------------------------ stage 2


def run_stage2(ledger: CallLedger, config: AFBSConfig, brackets: np.ndarray, valid: np.ndarray,
               binary_iters: int) -> np.ndarray:
  """High-fidelity bisection (Algorithm 1, lines 16–36) on every head's brackets, heads in lock-step.

  Args:
    brackets: f32 [heads, R, 2] start intervals [s_l, s_h]; valid: bool [heads, R].

  Returns:
    s_best: f32 [heads], the stage-2 choice (see the module docstring for the two modes' rules).
  """
  num_heads = brackets.shape[0]
  in_band_sparsity = np.zeros(num_heads, np.float32)  # Algorithm 1's sparsity_best (line 17).
  in_band_s = np.zeros(num_heads, np.float32)
  feasible_sparsity = np.full(num_heads, -np.inf, np.float32)  # band mode: best probe with error <= ε_high
  feasible_s = np.zeros(num_heads, np.float32)
  lowest_failed = np.ones(num_heads, np.float32)
  last_s = brackets[:, 0, 0].copy()
  for region in range(brackets.shape[1]):
    s_low, s_high = brackets[:, region, 0].copy(), brackets[:, region, 1].copy()
    needed = valid[:, region].copy()
    if config.acquisition == "band" and region > 0:
      # A later region cannot beat a feasible probe of the top bracket (sparsity grows with s), so the
      # budget goes to heads with no feasible probe yet (low fidelity was too optimistic): they retreat
      # to [0, lowest failed probe], a sound bracket since s = 0 is dense-equivalent.
      needed = ~np.isfinite(feasible_sparsity)
      s_low, s_high = np.zeros(num_heads, np.float32), lowest_failed.copy()
    local_sparsity = np.zeros(num_heads, np.float32)  # line 19
    local_s = s_low.copy()
    for _ in range(binary_iters):
      mid = np.where(needed, (s_low + s_high) / 2, last_s).astype(np.float32)
      error, sparsity, _ = ledger.query(mid, "high", CALIBRATION_INPUT, stage=2, needed=needed)
      last_s = np.where(needed, mid, last_s)
      passed = needed & (error <= config.eps_high)
      improves = passed & (error >= config.eps_low) & (sparsity > local_sparsity)
      local_sparsity = np.where(improves, sparsity, local_sparsity)
      local_s = np.where(improves, mid, local_s)
      better_feasible = passed & (sparsity > feasible_sparsity)
      feasible_sparsity = np.where(better_feasible, sparsity, feasible_sparsity)
      feasible_s = np.where(better_feasible, mid, feasible_s)
      lowest_failed = np.where(needed & ~passed, np.minimum(lowest_failed, mid), lowest_failed)
      s_low = np.where(passed, mid, s_low)
      s_high = np.where(needed & ~passed, mid, s_high)
    better = local_sparsity > in_band_sparsity  # lines 33–35
    in_band_sparsity = np.where(better, local_sparsity, in_band_sparsity)
    in_band_s = np.where(better, local_s, in_band_s)
  if config.acquisition == "paper":
    return in_band_s
  # Band mode keeps the sparsest probe with error <= ε_high. An in-band probe is not preferred over a
  # sparser one below ε_low: that one is better on both sparsity and error. With nothing feasible, keep
  # the top bracket's low-fidelity-feasible end for stage 3 to judge, unless a probe at or below it failed.
  unverified = np.where(lowest_failed <= brackets[:, 0, 0], 0.0, brackets[:, 0, 0])
  return np.where(np.isfinite(feasible_sparsity), feasible_s, unverified).astype(np.float32)


# ------------------------------------------------------------------------------------------------ driver


def _warm_start_s(warm_start: TuneResult | Sequence[float] | np.ndarray | None, num_heads: int):
  if warm_start is None:
    return None
  s = np.asarray(warm_start.s if isinstance(warm_start, TuneResult) else warm_start, np.float32).reshape(-1)
  if s.shape != (num_heads,) or not np.all(np.isfinite(s)) or np.any((s < 0) | (s > 1)):
    raise ValueError(f"warm_start must give a finite s in [0, 1] per head, shape [{num_heads}]; got {s}")
  return s


def stage2_brackets(config: AFBSConfig, mean: np.ndarray, std: np.ndarray):
  """Stage 2's start intervals from the stage-1 posterior: (brackets f32 [heads, R, 2], valid bool [heads, R]).

  Paper mode: the lowest-UCB regions; band mode: brackets around the feasibility boundary.
  """
  grid = np.asarray(gp.make_grid(config.grid_size))
  rank = "ucb" if config.acquisition == "paper" else "sparsity"
  regions, valid = gp.extract_low_ucb_regions(grid, mean, std, eps_high=config.eps_high,
                                              beta=config.ucb_beta, num_regions=config.num_regions, rank=rank)
  if config.acquisition == "paper":
    return regions, valid
  return gp.boundary_brackets(grid, mean, std, regions, valid, eps_high=config.eps_high,
                              beta=config.ucb_beta), valid


def tune_heads(
    evaluate: Evaluate,
    num_heads: int,
    config: AFBSConfig = AFBSConfig(),
    warm_start: TuneResult | Sequence[float] | np.ndarray | None = None,
) -> TuneResult:
  """Tunes the latent s of every head of one layer with AFBS-BO (stages 1–3).

  Args:
    evaluate: evaluate(s, fidelity, input_index) -> (error, sparsity). s: f32 [heads] in [0, 1];
      fidelity: "low" | "high"; input_index: 0 = the calibration input, 1..config.num_validation the
      validation inputs (only asked at "high"). error: f32 [heads] relative L1 vs dense; sparsity: f32
      [heads] in [0, 1].
    num_heads: number of heads evaluated per call.
    config: the AFBS-BO settings.
    warm_start: a previous `TuneResult` or s: [heads] (e.g. the previous layer's) to start from; it seeds
      stage 1 around it and uses the reduced budgets `warm_bo_iters` and `warm_binary_iters`.

  Returns:
    A `TuneResult`; `error` is the worst validation error at `s`.
  """
  if not callable(evaluate):
    raise ValueError(f"evaluate must be callable; got {type(evaluate).__name__}")
  if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
  if not isinstance(config, AFBSConfig):
    raise ValueError(f"config must be an AFBSConfig; got {type(config).__name__}")
  num_heads = int(num_heads)
  warm_s = _warm_start_s(warm_start, num_heads)
  bo_iters, binary_iters = config.budgets(warm=warm_s is not None)
  ledger = latent_ledger(evaluate, num_heads, config.cache_repeats)
  mean, std = run_stage1(ledger, config, num_heads, warm_s, bo_iters)
  brackets, valid = stage2_brackets(config, mean, std)
  s_best = run_stage2(ledger, config, brackets, valid, binary_iters)
  s, error, sparsity, fallbacks = run_stage3(ledger, config, s_best)
  return TuneResult(s=s, params=params_at(config.latent, s), error=error, sparsity=sparsity,
                    num_fallbacks=fallbacks, **ledger.result_fields())
