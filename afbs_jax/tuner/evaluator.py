"""Per-layer error/sparsity oracle for the tuner: one SpargeAttn launch evaluates every head of a layer.

`LayerEvaluator` holds one layer's captured Q/K/V for several inputs (input 0 is the calibration input,
inputs 1.. are validation inputs from disjoint text) and answers `evaluate(s, fidelity, input_index)`
with each head's relative L1 error against dense attention and its block sparsity. High fidelity uses
the full captured length; low fidelity uses the first `low_len` tokens of the input. Causal attention on a
prefix is exactly attention on a shorter run (a token never sees the future, and RoPE positions start
at 0 either way), so the short sequences need no second capture. The dense output of each (fidelity,
input) is computed once and cached; the sparse path is jitted once per shape, with τ, θ, λ as traced
[heads] arrays, so trying new s values never recompiles. Counters record, per fidelity, kernel
launches, head-evaluations, query tokens processed and wall time (measured after blocking on the result).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FIDELITIES = ("low", "high")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass
class FidelityCounters:
  """Work done at one fidelity: sparse launches, head-evaluations, query tokens, seconds."""

  launches: int = 0
  head_evaluations: int = 0
  tokens: int = 0
  wall_time_s: float = 0.0
  dense_launches: int = 0
  dense_wall_time_s: float = 0.0

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def _per_head_relative_l1(sparse: jax.Array, dense: jax.Array) -> jax.Array:
  """Σ|sparse − dense| / Σ|dense| per head over batch, tokens and head_dim; both [batch, T, heads, D]."""
  sparse = sparse.astype(jnp.float32)
  numerator = jnp.sum(jnp.abs(sparse - dense), axis=(0, 1, 3))
  denominator = jnp.sum(jnp.abs(dense), axis=(0, 1, 3))
  return numerator / jnp.maximum(denominator, jnp.finfo(jnp.float32).tiny)


@functools.partial(jax.jit, static_argnames=("block_size", "backend", "attention_sink"))
def _sparse_error_and_sparsity(q, k, v, dense, tau, theta, lam, *, block_size: int, backend: str,
                               attention_sink: bool) -> tuple[jax.Array, jax.Array]:
  """One launch for every head. Returns error f32 [heads] and sparsity f32 [heads]."""
  from kernels import sparge  # pylint: disable=g-import-not-at-top
  out, stats = sparge.sparge_attention(
      q, k, v, sparge.SpargeParams(tau=tau, theta=theta, lam=lam), causal=True,
      block_q=block_size, block_k=block_size, backend=backend, attention_sink=attention_sink,
      return_stats=True)
  # Clipped: a density computed as kept / valid may round a hair above 1 when every block is kept.
  sparsity = jnp.clip(1.0 - jnp.mean(stats.density.astype(jnp.float32), axis=0), 0.0, 1.0)
  return _per_head_relative_l1(out, dense), sparsity


@jax.jit
def _dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Exact causal attention in f32, one kv-head group at a time to bound the logits' memory.

  Args:
    q: [batch, T, heads, head_dim]; k, v: [batch, T, kv_heads, head_dim].

  Returns:
    f32 [batch, T, heads, head_dim].
  """
  heads, kv_heads = q.shape[2], k.shape[2]
  group = heads // kv_heads
  outputs = []
  for kv_head in range(kv_heads):
    q_group = q[:, :, kv_head * group:(kv_head + 1) * group].astype(jnp.float32)
    k_head = k[:, :, kv_head:kv_head + 1].astype(jnp.float32)
    v_head = v[:, :, kv_head:kv_head + 1].astype(jnp.float32)
    outputs.append(jax.nn.dot_product_attention(q_group, k_head, v_head, is_causal=True,
                                                implementation="xla"))
  return jnp.concatenate(outputs, axis=2)


class LayerEvaluator:
  """Evaluates SpargeAttn settings on one layer's captured activations (see the module docstring).

  Args:
    q: [num_inputs, T_high, heads, head_dim]; k, v: [num_inputs, T_high, kv_heads, head_dim].
      Input 0 is the calibration input; inputs 1..num_inputs-1 are validation inputs.
    low_len: low-fidelity length (a prefix of each input), 1 <= low_len <= T_high.
    latent: a `LatentMap` (s -> τ, θ, λ).
    block_size: block_q = block_k of the kernel.
    backend: kernel backend passed to `kernels.sparge` ("auto", "reference", ...).
    attention_sink: always keep key block 0, as SpargeAttn's tuned path does. LLM heads park most of
      their attention mass on the first tokens; without the sink column the top-CDF selection must spend
      its τ budget re-finding that block in every row, and the reachable sparsity at a 5 % error collapses
      (measured by experiments/latent_frontier.py).
  """

  def __init__(self, q: Any, k: Any, v: Any, *, low_len: int, latent: Any, block_size: int,
               backend: str = "auto", attention_sink: bool = True):
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_activations(q, k, v)
    high_len = q.shape[1]
    if not isinstance(low_len, (int, np.integer)) or not 1 <= low_len <= high_len:
      raise ValueError(f"low_len must be an int in [1, T_high={high_len}]; got {low_len!r}")
    if not isinstance(block_size, (int, np.integer)) or block_size <= 0:
      raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    self._q, self._k, self._v = q, k, v
    self.low_len = int(low_len)
    self.high_len = int(high_len)
    self.latent = latent
    self.block_size = int(block_size)
    self.backend = backend
    self.attention_sink = bool(attention_sink)
    self.counters = {fidelity: FidelityCounters() for fidelity in FIDELITIES}
    self._dense_cache: dict[tuple[str, int], jax.Array] = {}
    self._input_cache: dict[tuple[str, int], tuple[jax.Array, jax.Array, jax.Array]] = {}

  @property
  def num_heads(self) -> int:
    return int(self._q.shape[2])

  @property
  def num_inputs(self) -> int:
    return int(self._q.shape[0])

  @property
  def num_validation(self) -> int:
    return self.num_inputs - 1

  def length(self, fidelity: str) -> int:
    _check_fidelity(fidelity)
    return self.low_len if fidelity == "low" else self.high_len

  def __call__(self, s: Any, fidelity: str, input_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Error and sparsity of latent s: f32 [heads] in [0, 1]; returns (error [heads], sparsity [heads])."""
    s = np.asarray(s, np.float32)
    if s.shape != (self.num_heads,):
      raise ValueError(f"s must have shape [heads]=({self.num_heads},); got {s.shape}")
    tau, theta, lam = self.latent.to_arrays(s)
    return self.evaluate_params(tau, theta, lam, fidelity, input_index)

  def evaluate_params(self, tau: Any, theta: Any, lam: Any, fidelity: str,
                      input_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Error and sparsity of explicit per-head params, each f32 [heads] (for grid baselines)."""
    params = [jnp.broadcast_to(jnp.asarray(x, jnp.float32), (self.num_heads,)) for x in (tau, theta, lam)]
    q, k, v = self._inputs(fidelity, input_index)
    dense = self.dense_output(fidelity, input_index)
    start = time.perf_counter()
    error, sparsity = _sparse_error_and_sparsity(q, k, v, dense, *params, block_size=self.block_size,
                                                 backend=self.backend, attention_sink=self.attention_sink)
    error, sparsity = jax.block_until_ready((error, sparsity))
    counters = self.counters[fidelity]
    counters.wall_time_s += time.perf_counter() - start
    counters.launches += 1
    counters.head_evaluations += self.num_heads
    counters.tokens += int(q.shape[0] * q.shape[1])
    return np.asarray(error, np.float32), np.asarray(sparsity, np.float32)

  def dense_output(self, fidelity: str, input_index: int) -> jax.Array:
    """Cached dense attention output, f32 [1, T_fidelity, heads, head_dim]."""
    key = (fidelity, int(input_index))
    if key not in self._dense_cache:
      start = time.perf_counter()
      self._dense_cache[key] = jax.block_until_ready(_dense_attention(*self._inputs(fidelity, input_index)))
      self.counters[fidelity].dense_launches += 1
      self.counters[fidelity].dense_wall_time_s += time.perf_counter() - start
    return self._dense_cache[key]

  def reset_counters(self) -> None:
    """Zeroes the counters (the dense cache and compiled programs are kept)."""
    self.counters = {fidelity: FidelityCounters() for fidelity in FIDELITIES}

  def warm_up(self) -> None:
    """Compiles both fidelities and fills the dense cache for every input, then zeroes the counters.

    Benchmarks call this so that every tuner sharing the evaluator is timed on equal terms.
    """
    s = np.zeros(self.num_heads, np.float32)
    self(s, "low", 0)
    for index in range(self.num_inputs):
      self(s, "high", index)
    self.reset_counters()

  def totals(self) -> dict[str, float]:
    """Counters summed over fidelities, plus a per-fidelity breakdown."""
    total = {name: sum(getattr(c, name) for c in self.counters.values())
             for name in FidelityCounters.__dataclass_fields__}
    total["per_fidelity"] = {fidelity: c.as_dict() for fidelity, c in self.counters.items()}
    return total

  def _inputs(self, fidelity: str, input_index: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    _check_fidelity(fidelity)
    if not isinstance(input_index, (int, np.integer)) or not 0 <= input_index < self.num_inputs:
      raise ValueError(f"input_index must be an int in [0, {self.num_inputs - 1}]; got {input_index!r}")
    key = (fidelity, int(input_index))
    if key not in self._input_cache:
      # Sliced once: an eager slice is a device copy, which would otherwise be paid on every call.
      length, index = self.length(fidelity), int(input_index)
      self._input_cache[key] = tuple(x[index:index + 1, :length] for x in (self._q, self._k, self._v))
    return self._input_cache[key]


def _check_fidelity(fidelity: str) -> None:
  if fidelity not in FIDELITIES:
    raise ValueError(f"fidelity must be one of {FIDELITIES}; got {fidelity!r}")


def _check_activations(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [num_inputs, T, heads, head_dim]; got {q.shape=}, {k.shape=}, "
                     f"{v.shape=}")
  if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q, k, v must agree on num_inputs, T and head_dim (k and v fully); got {q.shape=}, "
                     f"{k.shape=}, {v.shape=}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
  if q.shape[0] < 1 or q.shape[1] < 1:
    raise ValueError(f"need at least one input and one token; got {q.shape=}")
