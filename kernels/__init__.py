"""Pallas kernels of afbs-jax, each with a pure-jnp reference beside it.

`kernels.block_sparse` is the generic front door (attention over the kept blocks of any block mask, on
every backend in `kernels.block_config.BACKEND_REGISTRY`); `kernels.sparge` adds SpargeAttn's mask
prediction on top of it. `kernels.sfa` is Sparse Feature Attention (top-k features of q and k, optionally
inside a block mask), with its own backends in `kernels.sfa.SFA_BACKENDS`.
"""
