"""AFBS-BO: per-head self-tuning of an attention method's parameters (SpargeAttn's τ, θ, λ by default)
through a 1-D latent s.

Public API: `tune_heads(evaluate, num_heads, AFBSConfig(...), warm_start=None) -> TuneResult`, the latent
map `LatentMap`, the runtime `DriftMonitor` with its reduced `retune_heads`, the grid-search tuners in
`afbs_jax.tuner.grid`, what they share in `afbs_jax.tuner.ledger`, and the registry of tuners by
name in `afbs_jax.tuner.registry`.
"""
from afbs_jax.tuner.ledger import CallLedger as CallLedger
from afbs_jax.tuner.afbs import tune_heads as tune_heads
from afbs_jax.tuner.config import AFBSConfig as AFBSConfig
from afbs_jax.tuner.config import TuneResult as TuneResult
from afbs_jax.tuner.drift import DriftMonitor as DriftMonitor
from afbs_jax.tuner.drift import retune_heads as retune_heads
from afbs_jax.tuner.latent import LatentMap as LatentMap
