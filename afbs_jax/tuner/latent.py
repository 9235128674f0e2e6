"""The 1-D latent map s ∈ [0, 1] → SpargeAttn thresholds (τ, θ, λ), per head.

AFBS-BO searches one scalar per head instead of three (the paper's Eq. 2). The map is linear in each knob,
but its directions follow the kernel's semantics rather than the paper's text: s = 0 is dense-equivalent
(τ = 1 keeps all mass, θ = 1 forces every block dense, λ at its no-skip end, so the error is exactly 0) and
s = 1 is the most aggressive setting. In the kernel a *lower* τ keeps fewer blocks, a *lower* θ forces fewer
blocks dense, and a λ closer to 0 skips more P·V tiles, so

    τ(s) = τ_max − s·(τ_max − τ_min)     θ(s) = θ_max − s·(θ_max − θ_min)     λ(s) = λ_min + s·(λ_max − λ_min)

Defaults: τ 1.0 → 0.5; θ 1.0 → 0.1 (block self-similarity of centred keys is a mean pairwise cosine in
[0, 1]; for LLM keys it sits mostly well below 0.5, so 0.1 still forces the few incoherent blocks dense at
s = 1 while θ = 1 forces all); λ −30 → −4 in natural-log units (e^−30 ≈ 1e-13 relative to the row max, far
below bf16/f32 resolution, so no tile is ever skipped at s = 0; e^−4 ≈ 0.018 skips tiles whose weights are
all below ~2 % of the row max). These bounds are configuration, not constants: measure on real activations
and override them through `AFBSConfig.latent`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LatentMap:
  """Linear map from the latent s to (τ, θ, λ); see the module docstring for directions and defaults."""

  tau_min: float = 0.5
  tau_max: float = 1.0
  theta_min: float = 0.1
  theta_max: float = 1.0
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
    if self.theta_max < 1.0:
      raise ValueError(f"LatentMap.theta_max must be >= 1 so that s=0 forces every block dense; got "
                       f"{self.theta_max}")
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

  def to_params(self, s: Any):
    """Maps s: f32 [heads] to `kernels.sparge.SpargeParams(tau, theta, lam)`, each f32 [heads]."""
    # Imported here, not at module level: the tuner's core (GP, search, baselines) never needs the Pallas
    # kernels, and keeping the import lazy lets it run where the kernels are not importable.
    from kernels.sparge import SpargeParams  # pylint: disable=g-import-not-at-top
    tau, theta, lam = self.to_arrays(s)
    return SpargeParams(tau=tau, theta=theta, lam=lam)
