"""Tunable attention methods: per-head parametrised attention that a tuner scores and a model deploys.

An `AttentionMethod` is a frozen dataclass (hashable, so it is static under jit) that names its per-head
parameters (`param_names`), says how a latent s maps onto them (`default_latent`), and computes attention
for one layer from `[heads]` parameter arrays (`attend`, which also reports the kept fraction per head).
Everything above it is method-agnostic: `afbs_jax.tuner.evaluator.LayerEvaluator` scores any method,
tuned checkpoints store the method's name, options and `[layers, heads]` tables, and `TunedAttention`
turns those tables back into a model policy. `MaskMethod` is the shortcut for block-sparse methods:
write `block_mask` (and optionally `skip_threshold`), and attention runs through
`kernels.block_sparse.run_block_sparse` on every backend.

Adding a method: a module with a subclass, plus one line in `afbs_jax.attention.registry.METHODS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from afbs_jax.attention.policy import check_qkv, per_head_table
from kernels.block_config import BlockSparseConfig

Params = Mapping[str, jax.Array]  # name -> f32 [heads]


@dataclasses.dataclass(frozen=True)
class AttentionMethod:
  """Base class; subclasses are frozen dataclasses whose fields are static options (JSON-serialisable).

  Class attributes:
    name: the registry name, stored in tuned checkpoints.
    param_names: the per-head parameters, in a fixed order.
    phase: "prefill" (a model attention policy) or "decode" (a decode policy against the KV cache,
      `afbs_jax.attention.decode.DecodeMethod`).
  """

  name: ClassVar[str] = ""
  param_names: ClassVar[tuple[str, ...]] = ()
  phase: ClassVar[str] = "prefill"

  def default_latent(self) -> Any:
    """The latent map (s ∈ [0, 1] → `param_dict`) a tuner searches when given none."""
    raise NotImplementedError(f"{type(self).__name__} defines no default latent map")

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, params: Params,
             blocks: BlockSparseConfig) -> tuple[jax.Array, jax.Array]:
    """One layer's attention.

    Args:
      q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim].
      params: {name: f32 [heads]} for every name in `param_names`; may be traced.
      blocks: the static block layout.

    Returns:
      out [batch, T, heads, head_dim] in q.dtype, and density f32 [batch, heads] (the kept fraction of
      causal-valid blocks; 1 − density is the method's sparsity). A decode-phase method returns only the
      last T' < T rows (the decode steps it simulates); the evaluator scores the rows returned.
    """
    raise NotImplementedError

  def options(self) -> dict[str, Any]:
    """The constructor arguments as JSON-ready values (stored with tuned parameters)."""
    return json_ready(dataclasses.asdict(self))

  @classmethod
  def from_options(cls, options: Mapping[str, Any]) -> AttentionMethod:
    """Inverse of `options`; override when a field is itself a dataclass."""
    return cls(**options)

  def check_params(self, params: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The parameters as f32 arrays, after checking that exactly `param_names` are given."""
    if set(params) != set(self.param_names):
      raise ValueError(f"{self.name} takes parameters {self.param_names}; got {tuple(params)}")
    return {name: jnp.asarray(params[name], jnp.float32) for name in self.param_names}

  def policy(self, tables: Mapping[str, Any], blocks: BlockSparseConfig) -> TunedAttention:
    """A model attention policy from {name: [layers, heads]} tables."""
    return TunedAttention(self, tables, blocks)


@dataclasses.dataclass(frozen=True)
class MaskMethod(AttentionMethod):
  """A method that predicts a block mask from its per-head parameters; attention is the shared kernel."""

  def block_mask(self, q: jax.Array, k: jax.Array, params: Params, blocks: BlockSparseConfig) -> jax.Array:
    """bool [batch, heads, n_q_blocks, n_k_blocks]; causal validity is ANDed in afterwards."""
    raise NotImplementedError

  def skip_threshold(self, params: Params) -> jax.Array | None:
    """λ for the P·V skip, f32 [heads] (None: never skip)."""
    del params
    return None

  def attend(self, q, k, v, params, blocks):
    # Lazily: the Pallas kernels load only when a sparse policy runs, never for a dense model.
    from kernels import block_sparse  # pylint: disable=g-import-not-at-top
    mask = self.block_mask(q, k, params, blocks)
    out, stats = block_sparse.run_block_sparse(q, k, v, mask, blocks, lam=self.skip_threshold(params))
    return out, stats.density


@jax.tree_util.register_pytree_node_class
class TunedAttention:
  """A model policy running `method` with per-layer, per-head parameter tables.

  Attributes:
    method: the AttentionMethod (static).
    tables: {name: f32 [layers, heads]}, one per `method.param_names` (pytree leaves: new values reuse the
      compiled forward).
    blocks: the BlockSparseConfig (static).
  """

  def __init__(self, method: AttentionMethod, tables: Mapping[str, Any], blocks: BlockSparseConfig):
    if not isinstance(method, AttentionMethod):
      raise ValueError(f"method must be an AttentionMethod; got {type(method).__name__}")
    if not isinstance(blocks, BlockSparseConfig):
      raise ValueError(f"blocks must be a BlockSparseConfig; got {type(blocks).__name__}")
    if set(tables) != set(method.param_names):
      raise ValueError(f"{method.name} needs tables {method.param_names}; got {tuple(tables)}")
    self.method = method
    self.blocks = blocks
    self.tables = {name: per_head_table(name, tables[name]) for name in method.param_names}
    shapes = {table.shape for table in self.tables.values()}
    if len(shapes) != 1:
      raise ValueError(f"{', '.join(method.param_names)} must share one [layers, heads] shape; got "
                       f"{', '.join(str(t.shape) for t in self.tables.values())}")

  @property
  def shape(self) -> tuple[int, int]:
    """[layers, heads]."""
    return tuple(next(iter(self.tables.values())).shape)

  @property
  def num_layers(self) -> int:
    return self.shape[0]

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int,
               q_positions: jax.Array | None = None) -> jax.Array:
    if q_positions is not None:
      raise NotImplementedError(f"{type(self).__name__} attends in prefill only (queries are the last T "
                                "keys); a decode step with q_positions needs DenseAttention for now")
    return self.attend(q, k, v, layer=layer)[0]

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s attention and its achieved block sparsity, f32 [batch, heads] (as the baselines'
    `attend`, so experiments measure every policy the same way)."""
    check_qkv(q, k, v)
    if q.shape[2] != self.shape[1] or not 0 <= layer < self.num_layers:
      raise ValueError(f"{type(self).__name__} holds [layers, heads]={self.shape}; got layer={layer} with "
                       f"{q.shape[2]} heads")
    params = {name: table[layer] for name, table in self.tables.items()}
    out, density = self.method.attend(q, k, v, params, self.blocks)
    return out, 1.0 - density

  def tree_flatten(self):
    return tuple(self.tables[name] for name in self.method.param_names), (self.method, self.blocks)

  @classmethod
  def tree_unflatten(cls, aux_data, children):
    # Bypasses __init__: jax unflattens with tracers and placeholder leaves that must not be validated.
    policy = object.__new__(cls)
    policy.method, policy.blocks = aux_data
    policy.tables = dict(zip(policy.method.param_names, children))
    return policy

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.method!r}, [layers, heads]={self.shape}, "
            f"block_q={self.blocks.block_q}, block_k={self.blocks.block_k}, backend={self.blocks.backend!r})")


def json_ready(value: Any) -> Any:
  """Tuples to lists, recursively, so that a value equals its own JSON round trip."""
  if isinstance(value, Mapping):
    return {str(key): json_ready(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_ready(item) for item in value]
  return value
