"""SpargeAttn with one hand-set (τ, θ, λ) shared by every head: the "manually tuned global" baseline.

This is the row that per-head tuning is compared against: the same predictor and kernel
(`afbs_jax.attention.SpargeMethod`, `kernels.sparge`), but one setting for all heads. θ is fixed below 0,
which trusts every pooled block so that τ alone sets the density, and λ = −inf never skips a P·V. τ is
chosen per call: a bisection on τ ∈ [0, 1] finds the smallest τ whose mean block density over batch and
heads reaches 1 − sparsity on the given q, k. So the mean block sparsity meets the target (to within
one block row's step, less where pooled scores tie, since ties are kept together) while single heads
spread around it — that spread is what per-head tuning removes. Unlike the other baselines it keeps
what SpargeAttn's predictor keeps: at least one block per query block, not necessarily the diagonal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from afbs_jax.attention import SpargeMethod
from afbs_jax.baselines.layout import layout
from afbs_jax.baselines.policy import BlockPolicy, baseline

THETA = -1.0          # Any θ < 0 trusts every pooled block: no block is forced dense.
BISECTION_STEPS = 24  # τ to within 2^-24, far finer than one block of density.


@baseline
class SpargeGlobal(BlockPolicy):
  """SpargeAttn with one τ for every head, fitted per call to the target; θ = −1, λ = −inf.

  Sparsity knob: τ (top-CDF mass of the pooled-score softmax).
  """

  name = "sparge_global"
  traceable = True

  def block_mask(self, q, k, *, layer=0):
    del layer  # The same setting in every layer; τ is refitted on each layer's own q, k.
    return self.mask_at(q, k, self.fit_tau(q, k))

  def mask_at(self, q: jax.Array, k: jax.Array, tau: jax.Array) -> jax.Array:
    """SpargeAttn's predicted block mask, τ (f32 scalar) for every head: bool [batch, heads, n_q, n_k]."""
    heads = q.shape[2]
    params = {"tau": jnp.full((heads,), tau, jnp.float32), "theta": jnp.full((heads,), THETA, jnp.float32),
              "lam": jnp.full((heads,), -jnp.inf, jnp.float32)}
    return SpargeMethod().block_mask(q, k, params, self.blocks)

  def fit_tau(self, q: jax.Array, k: jax.Array) -> jax.Array:
    """The smallest τ (to 2^-24) whose mean block density over batch and heads is >= 1 − sparsity."""
    return _fit_tau(self, q, k)


@jax.jit  # The policy's static fields and the shapes key the compile; a traced sparsity is an argument.
def _fit_tau(policy: SpargeGlobal, q: jax.Array, k: jax.Array) -> jax.Array:
  valid = layout(q.shape[1], k.shape[1], policy.block_size).valid
  target = 1.0 - policy.sparsity

  def step(_, bounds):
    low, high = bounds
    middle = 0.5 * (low + high)
    kept = jnp.sum(policy.mask_at(q, k, middle) & valid, dtype=jnp.float32)
    dense_enough = kept / (valid.sum() * q.shape[0] * q.shape[2]) >= target
    return jnp.where(dense_enough, low, middle), jnp.where(dense_enough, middle, high)

  # τ = 1 keeps every block, so `high` always meets the target.
  _, high = jax.lax.fori_loop(0, BISECTION_STEPS, step, (jnp.float32(0.0), jnp.float32(1.0)))
  return high
