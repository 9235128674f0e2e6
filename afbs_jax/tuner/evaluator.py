"""Per-layer error/sparsity oracle for the tuner: one launch of an attention method scores every head.

`LayerEvaluator` holds one layer's captured Q/K/V for several inputs (input 0 is the calibration input,
inputs 1.. are validation inputs from disjoint text) and an `AttentionMethod` (SpargeAttn by default in
the tuning pipeline, any registered method otherwise). It answers `evaluate(s, fidelity, input_index)`
(latent s through the latent map) and `evaluate_params(params, fidelity, input_index)` (raw per-head
parameters) with each head's relative L1 error against dense attention and its block sparsity (a
decode-phase method: over the decode steps it simulates, the last query rows). High fidelity uses
the full captured length; low fidelity uses the first `low_len` tokens of the input. Causal attention on a
prefix is exactly attention on a shorter run (a token never sees the future, and RoPE positions start
at 0 either way), so the short sequences need no second capture. The dense output of each (fidelity,
input) is computed once and cached; the sparse path is jitted once per shape, with the parameters as
traced [heads] arrays, so trying new values never recompiles. Counters record, per fidelity, kernel
launches, head-evaluations, query tokens processed and wall time (measured after blocking on the result).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.attention.method import AttentionMethod
from afbs_jax.attention.reference import dense_reference, relative_l1_per_head
from afbs_jax.tuner.config import FIDELITIES
from kernels.block_config import BlockSparseConfig


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


@functools.partial(jax.jit, static_argnames=("method", "blocks"))
def _error_and_sparsity(q, k, v, dense, params, *, method: AttentionMethod,
                        blocks: BlockSparseConfig) -> tuple[jax.Array, jax.Array]:
  """One launch for every head. Returns error f32 [heads] and sparsity f32 [heads].

  A method that returns only the last rows (a decode-phase method's decode steps) is scored on those rows
  of the dense output."""
  out, density = method.attend(q, k, v, params, blocks)
  # Clipped: a density computed as kept / valid may round a hair above 1 when every block is kept.
  sparsity = jnp.clip(1.0 - jnp.mean(density.astype(jnp.float32), axis=0), 0.0, 1.0)
  return relative_l1_per_head(out, dense[:, dense.shape[1] - out.shape[1]:]), sparsity


class LayerEvaluator:
  """Evaluates an attention method's settings on one layer's captured activations (module docstring).

  Args:
    q: [num_inputs, T_high, heads, head_dim]; k, v: [num_inputs, T_high, kv_heads, head_dim].
      Input 0 is the calibration input; inputs 1..num_inputs-1 are validation inputs.
    low_len: low-fidelity length (a prefix of each input), 1 <= low_len <= T_high.
    method: the `AttentionMethod` scored (e.g. `SpargeMethod(attention_sink=True)`).
    blocks: the `BlockSparseConfig` it runs with (block sizes, backend; causal).
    latent: the s → params map for `__call__` (default: `method.default_latent()`).
  """

  def __init__(self, q: Any, k: Any, v: Any, *, low_len: int, method: AttentionMethod,
               blocks: BlockSparseConfig, latent: Any | None = None):
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_activations(q, k, v)
    high_len = q.shape[1]
    if not isinstance(low_len, (int, np.integer)) or not 1 <= low_len <= high_len:
      raise ValueError(f"low_len must be an int in [1, T_high={high_len}]; got {low_len!r}")
    if not isinstance(method, AttentionMethod):
      raise ValueError(f"method must be an AttentionMethod; got {type(method).__name__}")
    if not isinstance(blocks, BlockSparseConfig):
      raise ValueError(f"blocks must be a BlockSparseConfig; got {type(blocks).__name__}")
    self._q, self._k, self._v = q, k, v
    self.low_len = int(low_len)
    self.high_len = int(high_len)
    self.method = method
    self.blocks = blocks
    self.latent = method.default_latent() if latent is None else latent
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
    return self.evaluate_params(self.latent.param_dict(s), fidelity, input_index)

  def evaluate_params(self, params: Mapping[str, Any], fidelity: str,
                      input_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Error and sparsity of explicit per-head params ({name: scalar or f32 [heads]}, for grid baselines)."""
    params = {name: jnp.broadcast_to(value, (self.num_heads,))
              for name, value in self.method.check_params(params).items()}
    q, k, v = self._inputs(fidelity, input_index)
    dense = self.dense_output(fidelity, input_index)
    start = time.perf_counter()
    error, sparsity = _error_and_sparsity(q, k, v, dense, params, method=self.method, blocks=self.blocks)
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
      self._dense_cache[key] = jax.block_until_ready(dense_reference(*self._inputs(fidelity, input_index)))
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
