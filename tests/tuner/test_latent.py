"""Tests of the latent map s → (τ, θ, λ)."""
from __future__ import annotations

import numpy as np
import pytest

from afbs_jax.tuner.latent import LatentMap


def test_s_zero_is_dense_equivalent():
  tau, theta, lam = (np.asarray(v) for v in LatentMap().to_arrays(np.zeros(4)))
  np.testing.assert_allclose(tau, 1.0)  # τ = 1 keeps every allowed block, whatever θ is
  np.testing.assert_allclose(theta, 0.2)
  np.testing.assert_allclose(lam, -30.0)  # no P·V tile is skipped


def test_s_one_is_the_aggressive_end():
  latent = LatentMap(tau_min=0.4, theta_min=0.2, lam_max=-5.0)
  tau, theta, lam = (np.asarray(v) for v in latent.to_arrays(np.ones(3)))
  np.testing.assert_allclose(tau, 0.4)
  np.testing.assert_allclose(theta, 0.2, rtol=1e-6)
  np.testing.assert_allclose(lam, -5.0)


def test_directions_are_monotone_toward_sparsity():
  s = np.linspace(0.0, 1.0, 33)
  tau, theta, lam = (np.asarray(v) for v in LatentMap().to_arrays(s))
  assert np.all(np.diff(tau) < 0) and np.all(np.diff(theta) < 0) and np.all(np.diff(lam) > 0)


def test_shapes_follow_heads_and_values_are_clipped():
  tau, theta, lam = LatentMap().to_arrays(np.array([-0.5, 0.25, 2.0]))
  assert tau.shape == theta.shape == lam.shape == (3,)
  np.testing.assert_allclose(np.asarray(tau), [1.0, 0.95, 0.8])


@pytest.mark.parametrize("kwargs", [dict(tau_min=0.9, tau_max=0.8), dict(tau_max=0.9), dict(theta_min=0.5),
                                    dict(lam_max=1.0), dict(lam_min=float("nan"))])
def test_bad_bounds_raise(kwargs):
  with pytest.raises(ValueError, match="LatentMap"):
    LatentMap(**kwargs)


def test_to_params_builds_kernel_params():
  sparge = pytest.importorskip("kernels.sparge")
  params = LatentMap().to_params(np.array([0.0, 1.0]))
  assert isinstance(params, sparge.SpargeParams)
  np.testing.assert_allclose(np.asarray(params.tau), [1.0, 0.8])
