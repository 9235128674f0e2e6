"""The base classes every baseline policy is built from: target validation, exact selection, the two paths.

A baseline is a frozen, keyword-only dataclass registered as a JAX pytree whose fields are static aux
data (hashable), so a model stores it and jits through it. The target is static too when it is a Python
number (exact numpy budgets, constant masks, a recompile per target); a `traceable` baseline also takes a
jax f32 scalar, its one leaf, so that every target shares one compiled program (a frontier sweep).
`BaselinePolicy.select` turns the target into an exact kept count (`afbs_jax.baselines.budget`) and keeps
each row's best cells by the subclass's `scores`. `BlockPolicy` selects key blocks and attends through
`kernels.block_sparse.run_block_sparse`; `TokenPolicy` selects keys and attends through a masked
`jax.nn.dot_product_attention`, `query_chunk` query rows at a time (`afbs_jax.baselines.chunks`), so no
[batch, heads, T, S] array exists in `attend`. Both take the model's call `policy(q, k, v, *, layer)` in
prefill only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.baselines.budget import keep_top, row_budgets, target_count
from afbs_jax.baselines.chunks import Chunk, chunk_size, join_chunks, scan_chunks
from afbs_jax.baselines.layout import Layout, layout, token_rows
from afbs_jax.baselines.sparsity import check_sparsity, check_traced_sparsity, expand_blocks
from kernels.block_config import BlockSparseConfig, check_backend, check_block_size
from kernels.block_sparse import check_qkv, run_block_sparse


def baseline(cls: type) -> type:
  """Class decorator: a frozen keyword-only dataclass and a pytree whose fields are static, but for a
  traced sparsity (a jax array), which is its one leaf."""
  cls = dataclasses.dataclass(frozen=True, kw_only=True, eq=False)(cls)
  names = tuple(field.name for field in dataclasses.fields(cls) if field.name != "sparsity")

  def flatten(policy):
    static = tuple(getattr(policy, name) for name in names)
    if isinstance(policy.sparsity, jax.Array):
      return (policy.sparsity,), (None, static)
    return (), (policy.sparsity, static)

  def unflatten(aux, children):
    # Bypasses __post_init__: jax unflattens with tracers and placeholder leaves that must not be validated.
    sparsity, static = aux
    children = tuple(children)
    policy = object.__new__(cls)
    object.__setattr__(policy, "sparsity", children[0] if children else sparsity)
    for name, value in zip(names, static):
      object.__setattr__(policy, name, value)
    return policy

  jax.tree_util.register_pytree_node(cls, flatten, unflatten)
  return cls


# Query rows per chunk where a baseline builds [batch, heads, rows, S] arrays: at SmolLM2's 9 heads and
# S = 8192 one such f32 array is 151 MB per batch element, against 2.4 GB for all T = 8192 rows.
QUERY_CHUNK = 512


def check_int(name: str, value: Any, minimum: int) -> int:
  """An int (not a bool) >= minimum, or a ValueError naming the field."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  return int(value)


def random_draw(sampler: Callable[..., jax.Array], seed: int, layer: int | jax.Array,
                shape: tuple[int, ...]) -> np.ndarray | jax.Array:
  """`sampler(key, shape)` (e.g. `jax.random.uniform`) with the key of (seed, layer): each layer draws its
  own pattern, reproducibly.

  With a concrete layer (a model's layer loop) the draw runs while tracing and comes back as numpy, so
  the ranking built on it (`budget.keep_top`) runs in numpy too and only the finished mask enters the
  compiled program. A jax constant instead would have XLA constant-fold a sort over every layer's
  [heads, rows, cols] scores while compiling, which takes tens of seconds per layer at 8K tokens.
  """
  with jax.ensure_compile_time_eval():
    draw = sampler(jax.random.fold_in(jax.random.key(seed), layer), shape)
  try:
    return np.asarray(draw)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return draw  # A traced layer index: the draw stays in the program.


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BaselinePolicy:
  """A sparse-attention baseline at a target sparsity.

  Attributes:
    sparsity: the target in [0, 1): block sparsity for block-level baselines, token sparsity for
      token-level ones (`afbs_jax.baselines.sparsity`). Past the point where only the diagonal is left the
      achieved sparsity saturates. A Python number is static; where `traceable`, a jax float scalar is
      kept as f32 [] and traced (the same masks as the Python float of that f32 value).
    block_size: tile size of block-level baselines and their kernel (a power of two >= 16).
    seed: drives every random choice (patterns, rotations, centroids), per layer.
    backend: the block-sparse kernel backend ("auto" is the jnp reference on CPU).

  Class attributes:
    name: the `afbs_jax.baselines.get` name.
    granularity: "block" or "token", what `sparsity` counts.
    traceable: whether `sparsity` may be traced: the pattern is jax, only its budget depends on the
      target (a numpy pattern shaped by the budget, e.g. a window's width, needs a static one).
  """

  name: ClassVar[str] = ""
  granularity: ClassVar[str] = ""
  traceable: ClassVar[bool] = False

  sparsity: float
  block_size: int = 64
  seed: int = 0
  backend: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "sparsity", self._check_target(self.sparsity))
    object.__setattr__(self, "block_size", check_block_size("block_size", self.block_size))
    object.__setattr__(self, "seed", check_int("seed", self.seed, 0))
    check_backend(self.backend)

  def _check_target(self, sparsity: Any) -> float | jax.Array:
    if not isinstance(sparsity, jax.Array):
      return check_sparsity(sparsity)
    if not self.traceable:
      raise ValueError(f"the {self.name} baseline needs a static sparsity, a Python number (its budget "
                       "shapes a numpy pattern or chunked selection); got a jax array")
    return check_traced_sparsity(sparsity)

  # Equal by value, a traced target by its f32 value, so that policies key dicts and jit caches.
  def __eq__(self, other: Any) -> bool:
    return type(other) is type(self) and self._identity() == other._identity()

  def __hash__(self) -> int:
    return hash((type(self), self._identity()))

  def _identity(self) -> tuple[Any, ...]:
    traced = isinstance(self.sparsity, jax.Array)
    return (traced, float(self.sparsity), *(getattr(self, field.name) for field in dataclasses.fields(self)
                                            if field.name != "sparsity"))

  @property
  def blocks(self) -> BlockSparseConfig:
    return BlockSparseConfig.square(self.block_size, causal=True, backend=self.backend)

  def scores(self, q: jax.Array, k: jax.Array, grid: Layout, counts: np.ndarray,
             layer: int | jax.Array) -> np.ndarray | jax.Array:
    """Per-cell priority, higher kept first; broadcastable to [batch, heads, rows, cols]. (Token-level
    baselines score chunks of query rows instead, `TokenPolicy.chunk_scores`.)

    `counts` (int [rows]) are the per-row kept counts, for patterns whose shape depends on the budget.
    Diagonal and causal-invalid cells are handled by `select`; their scores are ignored.
    """
    raise NotImplementedError

  def select(self, q: jax.Array, k: jax.Array, block: int, layer: int | jax.Array) -> jax.Array:
    """bool [batch, heads, rows, cols] on `block`-sized cells: exactly the target count per (batch, head)."""
    grid = layout(q.shape[1], k.shape[1], block)
    counts = row_budgets(grid.valid.sum(axis=1), grid.diagonal.sum(axis=1),
                         target_count(self.sparsity, grid.valid))
    scores = self.scores(q, k, grid, counts, layer)
    # Numpy scores rank in numpy (a constant mask); jax scores in one jitted step, not op by op eagerly.
    keep = (keep_top if isinstance(scores, np.ndarray) else _keep_top)(scores, grid.valid, grid.diagonal,
                                                                       counts)
    return jnp.broadcast_to(keep, (q.shape[0], q.shape[2], *grid.valid.shape))

  def token_mask(self, q: jax.Array, k: jax.Array, *, layer: int | jax.Array = 0) -> jax.Array:
    """What the policy keeps: bool [batch, heads, T, S], causal applied.

    q: [batch, T, heads, head_dim]; k: [batch, S, kv_heads, head_dim].
    """
    raise NotImplementedError

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
             layer: int | jax.Array = 0) -> tuple[jax.Array, jax.Array]:
    """out [batch, T, heads, head_dim] in q.dtype and the achieved sparsity f32 [batch, heads]."""
    raise NotImplementedError

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, layer: int | jax.Array,
               q_positions: jax.Array | None = None) -> jax.Array:
    if q_positions is not None:
      raise NotImplementedError(f"the {self.name} baseline attends in prefill only (queries are the last T "
                                "keys)")
    return self.attend(q, k, v, layer=layer)[0]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class BlockPolicy(BaselinePolicy):
  """A baseline that keeps key blocks per query block and runs the block-sparse kernel."""

  granularity = "block"

  def block_mask(self, q: jax.Array, k: jax.Array, *, layer: int | jax.Array = 0) -> jax.Array:
    """bool [batch, heads, n_q_blocks, n_k_blocks], causal-valid blocks only."""
    check_qkv(q, k, None)
    return self.select(q, k, self.block_size, layer)

  def token_mask(self, q, k, *, layer=0):
    return expand_blocks(self.block_mask(q, k, layer=layer), self.block_size, q.shape[1], k.shape[1])

  def attend(self, q, k, v, *, layer=0):
    check_qkv(q, k, v)
    out, stats = run_block_sparse(q, k, v, self.block_mask(q, k, layer=layer), self.blocks)
    return out, 1.0 - stats.density


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TokenPolicy(BaselinePolicy):
  """A baseline that keeps keys per query and runs masked dense attention (no kernel skips tokens).

  Selection and attention run `query_chunk` query rows at a time: a subclass scores one chunk of rows
  (`chunk_scores`), from what `prepare` computed once per call, and may carry state from chunk to chunk
  (H2O's accumulated mass). The chunk size changes memory, never the mask (the output only by float
  rounding: the attention's matrix shapes change).

  Attributes:
    query_chunk: query rows per chunk (a power of two >= 16; rounded up to a multiple of 16 and capped
      at T rounded up).
  """

  granularity = "token"

  query_chunk: int = QUERY_CHUNK

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "query_chunk", check_block_size("query_chunk", self.query_chunk))

  def prepare(self, q: jax.Array, k: jax.Array, layer: int | jax.Array) -> tuple[Any, Any]:
    """(context, carry): what every chunk reads, computed once from the whole q and k (O((T + S) · D),
    e.g. key hashes), and the first chunk's carry. Default: (None, None)."""
    del q, k, layer
    return None, None

  def chunk_scores(self, q_rows: jax.Array, k: jax.Array, chunk: Chunk, context: Any,
                   carry: Any) -> tuple[jax.Array, Any]:
    """Per-cell priority of one chunk of query rows, higher kept first, f32 [batch, heads, C, S], and the
    next chunk's carry. q_rows: [batch, C, heads, head_dim]; diagonal and causal-invalid cells are handled
    by the selection, their scores ignored."""
    raise NotImplementedError

  def token_mask(self, q, k, *, layer=0):
    check_qkv(q, k, None)
    return _run_chunks(self, q, k, None, *self.prepare(q, k, layer))[1]

  def attend(self, q, k, v, *, layer=0):
    check_qkv(q, k, v)
    kept, out = _run_chunks(self, q, k, v, *self.prepare(q, k, layer))
    return out, 1.0 - kept.astype(jnp.float32) / int(token_rows(q.shape[1], k.shape[1])[0].sum())


_keep_top = jax.jit(keep_top)


# Jitted so that an eager call (a sparsity measurement, layer by layer) compiles once per policy and shape
# rather than op by op; the layer enters only through `prepare`, outside. Under jit it is inlined.
@jax.jit
def _run_chunks(policy: TokenPolicy, q: jax.Array, k: jax.Array, v: jax.Array | None, context: Any,
                carry: Any) -> tuple[jax.Array, jax.Array]:
  """Selects, and with v attends, chunk by chunk: (kept cells int32 [batch, heads], out [batch, T, heads,
  head_dim] with v, else the mask bool [batch, heads, T, S])."""
  (batch, q_len, heads, _), kv_len = q.shape, k.shape[1]
  available, forced = token_rows(q_len, kv_len)
  counts = row_budgets(available, forced, target_count(policy.sparsity, available))

  def step(carry, q_rows, chunk):
    state, kept = carry
    scores, state = policy.chunk_scores(q_rows, k, chunk, context, state)
    keep = jnp.broadcast_to(keep_top(scores, chunk.valid, chunk.diagonal, chunk.counts),
                            (batch, heads, *chunk.valid.shape))
    kept = kept + jnp.sum(keep, axis=(-2, -1), dtype=jnp.int32)
    return (state, kept), keep if v is None else masked_attention(q_rows, k, v, keep)

  (_, kept), outs = scan_chunks(step, (carry, jnp.zeros((batch, heads), jnp.int32)), q, kv_len,
                                chunk_size(q_len, policy.query_chunk), counts)
  return kept, join_chunks(outs, 2 if v is None else 1, q_len)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention over the kept keys; a query that keeps none outputs 0 (only when S < T).

  q: [batch, T, heads, head_dim]; k, v: [batch, S, kv_heads, head_dim]; mask: bool [batch, heads, T, S].
  """
  out = jax.nn.dot_product_attention(q, k, v, mask=mask)
  any_kept = jnp.swapaxes(mask.any(axis=-1), 1, 2)[..., None]  # [batch, T, heads, 1]
  return jnp.where(any_kept, out, 0).astype(q.dtype)
