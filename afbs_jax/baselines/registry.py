"""The baseline registry: `get(name, sparsity=...)` builds a policy, `NAMES` lists Table I's in report order."""

from __future__ import annotations

import dataclasses
from typing import Any

from afbs_jax.baselines.fixed import Longformer, SparseTransformer, StreamingLLM, Window
from afbs_jax.baselines.h2o import H2O
from afbs_jax.baselines.oracle import TopKBlock, TopKToken
from afbs_jax.baselines.policy import BaselinePolicy
from afbs_jax.baselines.random_blocks import RandomBlocks, SparseSink
from afbs_jax.baselines.reformer import Reformer
from afbs_jax.baselines.routing import Routing
from afbs_jax.baselines.sparge_global import SpargeGlobal
from afbs_jax.baselines.vertical_slash import VerticalSlash

_TABLE_I = (Window, Longformer, SparseTransformer, StreamingLLM, H2O, SparseSink, RandomBlocks, TopKToken,
            TopKBlock, Reformer, Routing, SpargeGlobal)
# Built by `get` but swept only by experiments.frontier: Table I's and the Pareto curves' committed results
# predate it, and `NAMES` is what those experiments sweep and call complete.
_OTHERS = (VerticalSlash,)
POLICIES: dict[str, type[BaselinePolicy]] = {policy.name: policy for policy in (*_TABLE_I, *_OTHERS)}
NAMES: tuple[str, ...] = tuple(policy.name for policy in _TABLE_I)
_COMMON = ("sparsity", "block_size", "seed", "backend")


def get(name: str, *, sparsity: float, block_size: int = 64, seed: int = 0, backend: str = "auto",
        **options: Any) -> BaselinePolicy:
  """The baseline `name` at a target sparsity in [0, 1).

  Args:
    name: one of `POLICIES` (`NAMES` and vertical_slash).
    sparsity: block sparsity for block-level baselines, token sparsity for token-level ones.
    block_size: a power of two >= 16; the tiles of block-level baselines (and of block sparsity).
    seed: drives every random choice.
    backend: the block-sparse kernel backend.
    **options: the baseline's own fields (e.g. `n_buckets` for reformer).

  Returns:
    A policy: `policy(q, k, v, *, layer)`, `policy.token_mask(q, k)`, `policy.attend(q, k, v)`.
  """
  if name not in POLICIES:
    raise ValueError(f"unknown baseline {name!r}; choose one of: {', '.join(POLICIES)}")
  policy = POLICIES[name]
  allowed = tuple(field.name for field in dataclasses.fields(policy) if field.name not in _COMMON)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"{name} takes no option {', '.join(unknown)}; its options: "
                     f"{', '.join(allowed) or 'none'}")
  return policy(sparsity=sparsity, block_size=block_size, seed=seed, backend=backend, **options)
