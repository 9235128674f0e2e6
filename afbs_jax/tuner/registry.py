"""The registry of per-layer tuners: name → how it tunes one layer's evaluator.

Every entry takes a `LayerEvaluator` (any attention method), an `AFBSConfig` and an optional warm start
(the previous layer's s) and returns a `TuneResult`. `TUNERS` is the one list the command line, the
whole-model tuner and the benchmarks read. Adding a tuner is one `Tuner(...)` line here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from afbs_jax.tuner import grid
from afbs_jax.tuner.afbs import tune_heads
from afbs_jax.tuner.config import AFBSConfig, TuneResult


@dataclasses.dataclass(frozen=True)
class Tuner:
  """A per-layer tuner.

  Attributes:
    name: the `--tuner` value, stored in checkpoints.
    run: (evaluator, afbs_config, warm_start s [heads] or None) -> TuneResult.
    warm_starts: whether it uses the previous layer's s (AFBS-BO's reduced budgets).
    methods: the attention methods it can tune (None: any method with a latent map).
    summary: one line for `--help`.
  """

  name: str
  run: Callable[..., TuneResult]
  warm_starts: bool = False
  methods: tuple[str, ...] | None = None
  summary: str = ""


def sparge_grid_config(afbs_config: AFBSConfig) -> grid.SpargeGridConfig:
  """SpargeAttn-grid targets for an error band: l1 = the band's centre, pv_l1 = ε_high."""
  centre = 0.5 * (afbs_config.eps_low + afbs_config.eps_high)
  if centre >= afbs_config.eps_high:  # A zero-width band: SpargeAttn needs l1 < pv_l1.
    centre = 0.999 * afbs_config.eps_high
  return grid.SpargeGridConfig(l1=centre, pv_l1=afbs_config.eps_high, eps_high=afbs_config.eps_high,
                                    num_validation=afbs_config.num_validation)


TUNERS: dict[str, Tuner] = {tuner.name: tuner for tuner in (
    Tuner("afbs", lambda ev, config, warm: tune_heads(ev, ev.num_heads, config, warm_start=warm),
          warm_starts=True, summary="AFBS-BO: low-fidelity GP search, high-fidelity bisection, validation"),
    Tuner("spargeattn_grid", lambda ev, config, warm: grid.spargeattn_grid(
        ev.evaluate_params, ev.num_heads, sparge_grid_config(config)), methods=("sparge",),
          summary="SpargeAttn's own grid autotune in raw (tau, theta, lambda)"),
    Tuner("s_grid", lambda ev, config, warm: grid.s_grid(ev, ev.num_heads, config),
          summary="a plain grid on the latent s at spacing 0.05, then validation"),
)}


def get_tuner(name: str) -> Tuner:
  if name not in TUNERS:
    raise ValueError(f"tuner must be one of {tuple(TUNERS)}; got {name!r}")
  return TUNERS[name]


def run_tuner(evaluator, afbs_config: AFBSConfig, *, tuner: str,
              warm_start: np.ndarray | None = None) -> TuneResult:
  """Runs the tuner `tuner` on one layer's evaluator and returns its `TuneResult`."""
  entry = get_tuner(tuner)
  method = evaluator.method.name
  if entry.methods is not None and method not in entry.methods:
    raise ValueError(f"tuner {tuner!r} tunes only the methods {entry.methods}; got method {method!r}")
  return entry.run(evaluator, afbs_config, warm_start if entry.warm_starts else None)
