"""The latent maps s ∈ [0, 1] → per-head parameters now live with the attention methods they drive."""
from afbs_jax.attention.latent import LatentMap as LatentMap
from afbs_jax.attention.latent import LinearLatent as LinearLatent
