"""Stage-1 surrogate of AFBS-BO: a per-head Matérn-5/2 GP on error(s), its acquisitions, and regions.

Every head has its own GP over the low-fidelity error curve error(s), s ∈ [0, 1]. The heads' observations
live in one fixed-size padded buffer `x, y: [heads, capacity]` with a `mask` of used slots; padded slots are
moved far outside [0, 1] and given a huge noise, so they neither correlate with nor inform any grid point.
Shapes therefore never change during a search and `acquisition_step` (posterior on a dense s-grid, the
acquisition, and its argmax for every head, vmapped) compiles once. The GP works on standardised errors:
mean = the observed mean, amplitude = the observed std (floored, so all-equal errors stay well posed), a
fixed length scale (the paper's 0.2) and an explicit noise jitter relative to the amplitude, so duplicate
points or a collapsing variance never make the posterior singular or NaN.

Acquisitions (`acquisition` in `AFBSConfig`):
  * "paper": Expected Improvement on error, Eq. 5, with f̂ = the minimum observed error. It follows the
    paper literally; note that minimising error alone pulls the search toward s → 0 (dense attention has
    zero error), so it explores the *low-error* end and leaves the band boundary to stage 2.
  * "band": constrained expected improvement on the sparsity proxy s. The goal is the largest s whose error
    stays <= ε_high. The improvement of probing s over the incumbent s⁺ (the largest observed s with
    error <= ε_high, or 0, which is dense-equivalent and always feasible) is max(s − s⁺, 0); it is known
    exactly, so its expectation under the constraint is that gain times the probability of feasibility
    PoF(s) = Φ((ε_high − μ(s)) / σ(s)) (Gardner et al., 2014, "Bayesian optimization with inequality
    constraints"), restricted to s below the smallest observed violation (error is monotone in s up to
    noise, and beyond the data the GP reverts to its mean, which would make far-right points look
    feasible). It keeps proposing points just beyond the current feasible frontier, where PoF is still
    high, and stops (re-proposes s⁺) when no point can improve with non-negligible probability. The band's
    lower edge needs no separate target: sparsity grows with s, so the largest feasible s lands at the
    top of the band unless the error jumps across it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats
import numpy as np
import tinygp

# Padded slots sit this far from [0, 1] (in s units; Matérn-5/2 at 1e3/0.2 length scales is exactly 0 in
# f32) and carry this much relative noise, so they are invisible to the posterior.
_PAD_X = 1e3
_PAD_NOISE = 1e6
# A band-acquisition maximum below this means no point improves on s⁺ with non-negligible probability.
_BAND_DONE_TOL = 1e-7
_STD_FLOOR = 1e-9


def make_grid(grid_size: int) -> jnp.ndarray:
  """The dense s-grid: f32 [grid_size], evenly spaced over [0, 1] (both ends included)."""
  return jnp.linspace(0.0, 1.0, grid_size, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames=("length_scale", "noise", "amplitude_floor"))
def posterior_on_grid(
    x: jnp.ndarray,
    y: jnp.ndarray,
    mask: jnp.ndarray,
    grid: jnp.ndarray,
    *,
    length_scale: float,
    noise: float,
    amplitude_floor: float,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """GP posterior of one head's error curve on the grid.

  Args:
    x: f32 [capacity] observed s; y: f32 [capacity] observed errors; mask: bool [capacity] used slots.
    grid: f32 [grid_size] where to evaluate the posterior.
    length_scale, noise, amplitude_floor: see `AFBSConfig`.

  Returns:
    (mean, std): f32 [grid_size] each, in error units.
  """
  count = jnp.maximum(jnp.sum(mask), 1)
  data_mean = jnp.sum(jnp.where(mask, y, 0.0)) / count
  data_var = jnp.sum(jnp.where(mask, (y - data_mean) ** 2, 0.0)) / count
  amplitude = jnp.maximum(jnp.sqrt(data_var), amplitude_floor)
  y_std = jnp.where(mask, (y - data_mean) / amplitude, 0.0)
  x_pad = jnp.where(mask, x, _PAD_X + jnp.arange(x.shape[0], dtype=x.dtype))
  diag = jnp.where(mask, noise, _PAD_NOISE)
  gp = tinygp.GaussianProcess(tinygp.kernels.Matern52(scale=length_scale), x_pad, diag=diag, mean=0.0)
  conditioned = gp.condition(y_std, grid).gp
  mean = data_mean + amplitude * conditioned.loc
  std = amplitude * jnp.sqrt(jnp.maximum(conditioned.variance, 0.0))
  return mean, std


def expected_improvement(mean: jnp.ndarray, std: jnp.ndarray, best: jnp.ndarray) -> jnp.ndarray:
  """Eq. 5: EI(s) = (f̂ − μ)Φ(Z) + σφ(Z), Z = (f̂ − μ)/σ, for minimisation; finite for σ → 0."""
  std = jnp.maximum(std, _STD_FLOOR)
  gain = best - mean
  z = gain / std
  return gain * jstats.norm.cdf(z) + std * jstats.norm.pdf(z)


def probability_feasible(mean: jnp.ndarray, std: jnp.ndarray, eps_high: float) -> jnp.ndarray:
  """PoF(s) = P(error(s) <= ε_high) under the posterior."""
  return jstats.norm.cdf((eps_high - mean) / jnp.maximum(std, _STD_FLOOR))


def band_acquisition(grid: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray, incumbent: jnp.ndarray,
                     eps_high: float) -> jnp.ndarray:
  """Constrained EI on s: max(s − s⁺, 0)·PoF(s); see the module docstring."""
  return jnp.maximum(grid - incumbent, 0.0) * probability_feasible(mean, std, eps_high)


def _propose_one(x, y, mask, grid, *, mode, eps_high, length_scale, noise, amplitude_floor):
  """One head: posterior on the grid and the next s to evaluate (f32 scalar)."""
  mean, std = posterior_on_grid(x, y, mask, grid, length_scale=length_scale, noise=noise,
                                amplitude_floor=amplitude_floor)
  if mode == "paper":
    best = jnp.min(jnp.where(mask, y, jnp.inf))
    acquisition = expected_improvement(mean, std, best)
    next_s = grid[jnp.argmax(acquisition)]
  else:
    incumbent = jnp.max(jnp.where(mask & (y <= eps_high), x, 0.0))
    # Trust the error's monotone trend in s: never propose above an observed violation. Without this
    # the GP's reversion to its mean beyond the data makes far-right points look feasible.
    ceiling = jnp.min(jnp.where(mask & (y > eps_high), x, jnp.inf))
    acquisition = jnp.where(grid < ceiling, band_acquisition(grid, mean, std, incumbent, eps_high), 0.0)
    best_index = jnp.argmax(acquisition)
    next_s = jnp.where(acquisition[best_index] > _BAND_DONE_TOL, grid[best_index], incumbent)
  return next_s, mean, std


@functools.partial(jax.jit, static_argnames=("mode", "eps_high", "length_scale", "noise", "amplitude_floor"))
def acquisition_step(
    x: jnp.ndarray,
    y: jnp.ndarray,
    mask: jnp.ndarray,
    grid: jnp.ndarray,
    *,
    mode: str,
    eps_high: float,
    length_scale: float,
    noise: float,
    amplitude_floor: float,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Fits every head's GP and maximises the acquisition on the grid, in one jitted, vmapped step.

  Args:
    x, y: f32 [heads, capacity] observations (s, low-fidelity error); mask: bool [heads, capacity].
    grid: f32 [grid_size].
    mode: "band" | "paper"; the rest as in `AFBSConfig`.

  Returns:
    next_s: f32 [heads]; mean, std: f32 [heads, grid_size] posterior on the grid.
  """
  propose = functools.partial(_propose_one, grid=grid, mode=mode, eps_high=eps_high,
                              length_scale=length_scale, noise=noise, amplitude_floor=amplitude_floor)
  return jax.vmap(propose)(x, y, mask)


def _true_runs(flags: np.ndarray) -> list[tuple[int, int]]:
  """Maximal runs of True in a 1-D bool array, as inclusive (first, last) index pairs."""
  padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
  edges = np.diff(padded)
  starts = np.flatnonzero(edges == 1)
  ends = np.flatnonzero(edges == -1) - 1
  return list(zip(starts.tolist(), ends.tolist()))


def extract_low_ucb_regions(
    grid: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    eps_high: float,
    beta: float,
    num_regions: int,
    rank: str,
) -> tuple[np.ndarray, np.ndarray]:
  """Promising regions per head: where the error is confidently <= ε_high.

  Definition: UCB(s) = μ(s) + β·σ(s) on the grid; a region is a maximal contiguous run of grid points with
  UCB(s) <= ε_high, reported as [s_first, s_last]. Regions are ranked by `rank`:
    * "sparsity" (band mode): by their right end, largest first (the most sparsity-promising);
    * "ucb" (paper mode): by their lowest UCB, lowest first;
  and the top `num_regions` are kept. A head with no such run gets one fallback region [grid[0], grid[0]]
  = {s = 0}, the dense-equivalent end, which is always feasible.

  Args:
    grid: f32 [grid_size]; mean, std: f32 [heads, grid_size] (the posterior on the grid).

  Returns:
    regions: f32 [heads, num_regions, 2] ([s_low, s_high]); valid: bool [heads, num_regions].
  """
  if rank not in ("sparsity", "ucb"):
    raise ValueError(f"rank must be 'sparsity' or 'ucb'; got {rank!r}")
  grid = np.asarray(grid, np.float32)
  ucb = np.asarray(mean, np.float32) + beta * np.asarray(std, np.float32)
  num_heads = ucb.shape[0]
  regions = np.zeros((num_heads, num_regions, 2), np.float32)
  valid = np.zeros((num_heads, num_regions), bool)
  for head in range(num_heads):
    runs = _true_runs(ucb[head] <= eps_high)
    if rank == "sparsity":
      runs.sort(key=lambda run: -run[1])
    else:
      runs.sort(key=lambda run: float(ucb[head, run[0]:run[1] + 1].min()))
    runs = runs[:num_regions] or [(0, 0)]
    for slot, (first, last) in enumerate(runs):
      regions[head, slot] = (grid[first], grid[last])
      valid[head, slot] = True
  return regions, valid


def boundary_brackets(
    grid: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    regions: np.ndarray,
    valid: np.ndarray,
    *,
    eps_high: float,
    beta: float,
) -> np.ndarray:
  """Band mode: turns each region [a, b] into a bisection bracket [b, c] around the feasibility boundary.

  b (the region's right end) is confidently feasible; c is the first grid point above b whose lower
  confidence bound μ − β·σ exceeds ε_high (confidently infeasible), or 1 if there is none. The boundary
  max{s : error(s) <= ε_high} to the right of the region therefore lies in [b, c].

  Args:
    grid: f32 [grid_size]; mean, std: f32 [heads, grid_size]; regions: f32 [heads, R, 2]; valid: [heads, R].

  Returns:
    brackets: f32 [heads, R, 2].
  """
  grid = np.asarray(grid, np.float32)
  infeasible = (np.asarray(mean) - beta * np.asarray(std)) > eps_high  # [heads, grid_size]
  brackets = np.array(regions, np.float32, copy=True)
  for head, slot in zip(*np.nonzero(valid)):
    right = regions[head, slot, 1]
    above = np.flatnonzero(infeasible[head] & (grid > right))
    brackets[head, slot] = (right, grid[above[0]] if above.size else grid[-1])
  return brackets
