"""Runtime drift detection and reduced re-tuning (the paper's adaptive re-calibration).

A `DriftMonitor` watches the per-head error of the deployed sparse attention batch by batch. When the
worst head's error exceeds ε_high on `window` consecutive batches (the paper uses 100), it reports a
trigger and, if given one, calls a re-tune callback; `retune_heads` is the matching reduced re-tune
(warm-started from the current setting, 8 low-fidelity BO calls and 2 bisection steps per region).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from afbs_jax.attention import reference
from afbs_jax.tuner.afbs import Evaluate, tune_heads
from afbs_jax.tuner.config import AFBSConfig, TuneResult

# The paper's re-calibration budget: 8 BO evaluations (3 warm initial points + 5 iterations), 2 bisections.
RETUNE_BO_ITERS = 5
RETUNE_BINARY_ITERS = 2


def relative_l1_per_head(sparse_out: Any, dense_out: Any) -> np.ndarray:
  """Σ|o − o_ref| / Σ|o_ref| per head (`afbs_jax.attention.relative_l1_per_head`) as numpy f32 [heads].

  Args:
    sparse_out, dense_out: [batch, seq, heads, head_dim].
  """
  return np.asarray(reference.relative_l1_per_head(jnp.asarray(sparse_out), jnp.asarray(dense_out)))


class DriftMonitor:
  """Counts consecutive batches whose worst-case head error exceeds ε_high; triggers at `window`.

  After a trigger the count restarts from zero, so a persisting drift triggers again only after another
  full window (and a successful re-tune is expected to stop it).
  """

  def __init__(self, eps_high: float, window: int = 100, retune: Callable[[], Any] | None = None):
    """Args: eps_high: the error ceiling; window: consecutive bad batches that trigger; retune: optional
    callback invoked on a trigger (its return value is kept in `last_retune`)."""
    if not (np.isfinite(eps_high) and eps_high >= 0):
      raise ValueError(f"eps_high must be a finite value >= 0; got {eps_high!r}")
    if not isinstance(window, int) or window < 1:
      raise ValueError(f"window must be an int >= 1; got {window!r}")
    if retune is not None and not callable(retune):
      raise ValueError(f"retune must be callable or None; got {type(retune).__name__}")
    self.eps_high = float(eps_high)
    self.window = window
    self.retune = retune
    self.consecutive = 0
    self.num_batches = 0
    self.num_triggers = 0
    self.last_retune: Any = None

  def observe(self, error_per_head: Any) -> bool:
    """Records one batch's error: f32 [heads]. Returns True iff this batch completes a drift window."""
    errors = np.asarray(error_per_head, np.float32).reshape(-1)
    if errors.size == 0:
      raise ValueError("error_per_head must hold at least one head's error; got an empty array")
    self.num_batches += 1
    # A NaN error is a broken output, so it counts as drift rather than passing silently.
    worst = np.nan if np.any(np.isnan(errors)) else float(errors.max())
    self.consecutive = self.consecutive + 1 if not worst <= self.eps_high else 0
    if self.consecutive < self.window:
      return False
    self.consecutive = 0
    self.num_triggers += 1
    if self.retune is not None:
      self.last_retune = self.retune()
    return True

  def observe_outputs(self, sparse_out: Any, dense_out: Any) -> bool:
    """Like `observe`, from the outputs of one batch: [batch, seq, heads, head_dim] each."""
    return self.observe(relative_l1_per_head(sparse_out, dense_out))


def retune_config(config: AFBSConfig, bo_iters: int = RETUNE_BO_ITERS,
                  binary_iters: int = RETUNE_BINARY_ITERS) -> AFBSConfig:
  """`config` with the reduced warm-start budgets used for re-calibration."""
  return dataclasses.replace(config, warm_bo_iters=bo_iters, warm_binary_iters=binary_iters)


def retune_heads(evaluate: Evaluate, num_heads: int, config: AFBSConfig,
                 current: TuneResult | np.ndarray) -> TuneResult:
  """Reduced re-tune: `tune_heads` warm-started at `current` with `retune_config(config)`."""
  return tune_heads(evaluate, num_heads, retune_config(config), warm_start=current)
