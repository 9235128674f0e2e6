"""afbs-jax: self-tuning block-sparse attention (SpargeAttn semantics) tuned per head by AFBS-BO."""

__version__ = "0.1.0"

# The layer for your own Flax model (afbs_jax/layers.py), loaded on first use so that importing any
# afbs_jax module (the CLI, a config) does not pay for flax and the kernels.
_LAYER_NAMES = ("SparseAttention", "SparsityThreshold", "sparse_attention")
__all__ = list(_LAYER_NAMES)


def __getattr__(name: str):
  if name in _LAYER_NAMES:
    from afbs_jax import layers  # pylint: disable=g-import-not-at-top
    return getattr(layers, name)
  raise AttributeError(f"module 'afbs_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_LAYER_NAMES])
