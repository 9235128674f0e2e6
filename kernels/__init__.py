"""Pallas kernels of afbs-jax, each with a pure-jnp reference beside it.

`kernels.sparge` is the public entry point (SpargeAttn-style block-sparse attention).
"""
