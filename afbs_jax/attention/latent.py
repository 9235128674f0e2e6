"""Latent maps: one scalar s ∈ [0, 1] per head → the named per-head parameters of an attention method.

A tuner searches s; a latent map turns it into the method's parameters (`param_dict(s)` → {name: f32
[heads]}), with s = 0 dense-equivalent (or the method's most accurate setting) and s = 1 its most
aggressive one. `LinearLatent` is the generic linear map for any method; `LatentMap` is SpargeAttn's.

SpargeAttn's map (`LatentMap`) turns s into the thresholds (τ, θ, λ).

AFBS-BO searches one scalar per head instead of three (the paper's Eq. 2). The map is linear in each knob,
but its directions follow the kernel's semantics rather than the paper's text: s = 0 is dense-equivalent
(τ = 1 keeps every allowed block and λ sits at its no-skip end, so the error is exactly 0) and
s = 1 is the most aggressive setting. In the kernel a *lower* τ keeps fewer blocks, a *lower* θ forces fewer
blocks dense, and a λ closer to 0 skips more P·V tiles, so

    τ(s) = τ_max − s·(τ_max − τ_min)     θ(s) = θ_max − s·(θ_max − θ_min)     λ(s) = λ_min + s·(λ_max − λ_min)

Defaults: τ 1.0 → 0.8, θ 0.2 → −0.1, λ −30 → −4 (natural-log units). s = 0 is dense because τ = 1 keeps every
allowed block (the kernel treats τ ≥ 1 as "keep all"), whatever θ is. The τ range is narrow because real
heads lose their 5 % error budget within the last few percent of attention mass: on SmolLM2-135M the
sparsest (τ, θ) grid point with error ≤ 0.055 sits at τ ∈ [0.9, 0.999] for almost every head, with the
similarity filter off (θ < 0). θ therefore starts low (0.2: only incoherent blocks are forced dense) and
ends with the filter off; a θ range starting at 1 wastes the first half of s on settings that force every
block dense. λ at −30 (e^−30 ≈ 1e-13 of the row max) never skips a tile; at −4 tiles whose weights are all
below ~2 % of the row max are skipped. experiments/latent_frontier.py measures the frontier these bounds
were chosen from (results/latent_frontier.json); the bounds are configuration, overridable through
`AFBSConfig.latent`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LatentMap:
  """Linear map from the latent s to (τ, θ, λ); see the module docstring for directions and defaults."""

  tau_min: float = 0.8
  tau_max: float = 1.0
  theta_min: float = -0.1
  theta_max: float = 0.2
  lam_min: float = -30.0
  lam_max: float = -4.0

  def __post_init__(self):
    for low_name, high_name in (("tau_min", "tau_max"), ("theta_min", "theta_max"), ("lam_min", "lam_max")):
      low, high = getattr(self, low_name), getattr(self, high_name)
      if not (np.isfinite(low) and np.isfinite(high)) or low > high:
        raise ValueError(f"LatentMap needs finite {low_name} <= {high_name}; got {low_name}={low}, "
                         f"{high_name}={high}")
    if self.tau_max < 1.0:
      raise ValueError(f"LatentMap.tau_max must be >= 1 so that s=0 keeps every block; got {self.tau_max}")
    if self.lam_max > 0.0:
      raise ValueError(f"LatentMap.lam_max must be <= 0 (natural-log units, 0 skips everything); got "
                       f"{self.lam_max}")

  def to_arrays(self, s: Any) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Maps s: f32 [heads] (or any shape) in [0, 1] to (tau, theta, lam), each f32 of s's shape.

    Values of s outside [0, 1] are clipped, so the result is always a valid kernel setting.
    """
    s = jnp.clip(jnp.asarray(s, jnp.float32), 0.0, 1.0)
    tau = self.tau_max - s * (self.tau_max - self.tau_min)
    theta = self.theta_max - s * (self.theta_max - self.theta_min)
    lam = self.lam_min + s * (self.lam_max - self.lam_min)
    return tau, theta, lam

  def param_dict(self, s: Any) -> dict[str, jnp.ndarray]:
    """Maps s: f32 [heads] to {"tau", "theta", "lam"}, each f32 [heads] (see `to_arrays`)."""
    return dict(zip(("tau", "theta", "lam"), self.to_arrays(s)))

  def to_params(self, s: Any):
    """Maps s: f32 [heads] to `kernels.sparge.SpargeParams(tau, theta, lam)`, each f32 [heads]."""
    # Imported here, not at module level: the tuner's core (GP, search, baselines) never needs the Pallas
    # kernels, and keeping the import lazy lets it run where the kernels are not importable.
    from kernels.sparge import SpargeParams  # pylint: disable=g-import-not-at-top
    tau, theta, lam = self.to_arrays(s)
    return SpargeParams(tau=tau, theta=theta, lam=lam)


@dataclasses.dataclass(frozen=True)
class LinearLatent:
  """A linear latent for any method: each knob moves from its s = 0 value to its s = 1 value.

  Attributes:
    knobs: ((name, value_at_s0, value_at_s1), ...), one entry per per-head parameter of the method.
  """

  knobs: tuple[tuple[str, float, float], ...]

  def __post_init__(self):
    knobs = tuple((str(name), float(start), float(end)) for name, start, end in self.knobs)
    if not knobs or len({name for name, _, _ in knobs}) != len(knobs):
      raise ValueError(f"LinearLatent needs at least one knob and distinct names; got {self.knobs!r}")
    if not all(np.isfinite(start) and np.isfinite(end) for _, start, end in knobs):
      raise ValueError(f"LinearLatent knob ends must be finite; got {self.knobs!r}")
    object.__setattr__(self, "knobs", knobs)

  def param_dict(self, s: Any) -> dict[str, jnp.ndarray]:
    """Maps s: f32 [heads] (clipped to [0, 1]) to {name: f32 [heads]}."""
    s = jnp.clip(jnp.asarray(s, jnp.float32), 0.0, 1.0)
    return {name: start + s * (end - start) for name, start, end in self.knobs}

