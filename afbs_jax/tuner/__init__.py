"""AFBS-BO: per-head self-tuning of SpargeAttn's (τ, θ, λ) through a 1-D latent s.

Public API: `tune_heads(evaluate, num_heads, AFBSConfig(...), warm_start=None) -> TuneResult`, the latent
map `LatentMap`, the runtime `DriftMonitor` with its reduced `retune_heads`, and the grid-search baselines
in `afbs_jax.tuner.baselines`.
"""
from afbs_jax.tuner.afbs import CallLedger as CallLedger
from afbs_jax.tuner.afbs import tune_heads as tune_heads
from afbs_jax.tuner.config import AFBSConfig as AFBSConfig
from afbs_jax.tuner.config import TuneResult as TuneResult
from afbs_jax.tuner.drift import DriftMonitor as DriftMonitor
from afbs_jax.tuner.drift import retune_heads as retune_heads
from afbs_jax.tuner.latent import LatentMap as LatentMap
