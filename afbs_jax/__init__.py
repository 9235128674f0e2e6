"""afbs-jax: self-tuning block-sparse attention (SpargeAttn semantics) tuned per head by AFBS-BO."""

__version__ = "0.1.0"
