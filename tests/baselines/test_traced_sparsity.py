"""A traced sparsity (a jax f32 scalar, the policy's one leaf) against the static Python float: the same
counts, budgets and masks, one compiled program for every target, and the same validation and equality."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afbs_jax.baselines as baselines
from afbs_jax.baselines import budget
from afbs_jax.baselines.layout import layout
from tests.baselines import _oracles

TRACEABLE = ("sparge_global", "topk_block", "vertical_slash")
LEVELS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # the frontier's levels, and 0
BLOCK = 16
# Square, T < S, and partial last blocks; 80 x 80 has 15 valid blocks, where (1 − 0.9) · 15 is a half.
SHAPES = [(64, 64), (50, 96), (80, 80), (100, 100)]


def _static(level: float) -> float:
  """The Python float a traced level equals: its float32 value."""
  return float(np.float32(level))


@pytest.mark.parametrize("cells", [1, 5, 10, 15, 36, 136, 528])
def test_traced_count_is_the_static_count_at_every_float32(cells):
  levels = np.concatenate([np.float32(LEVELS), np.random.default_rng(cells).random(300, np.float32)])
  counts = jax.vmap(lambda s: budget.target_count(s, np.ones(cells)))(jnp.asarray(levels))
  assert counts.dtype == jnp.int32
  np.testing.assert_array_equal(counts, [budget.target_count(float(s), np.ones(cells)) for s in levels])


@pytest.mark.parametrize("q_len, kv_len", SHAPES)
def test_traced_row_budgets_are_the_static_budgets(q_len, kv_len):
  grid = layout(q_len, kv_len, BLOCK)
  available, forced = grid.valid.sum(axis=1), grid.diagonal.sum(axis=1)
  totals = np.arange(-1, available.sum() + 2)  # past both ends too: the clip
  traced = jax.vmap(lambda total: budget.row_budgets(available, forced, total))(jnp.asarray(totals, jnp.int32))
  np.testing.assert_array_equal(traced, [budget.row_budgets(available, forced, int(t)) for t in totals])


@jax.jit
def _jitted_mask(policy, q, k):
  return policy.block_mask(q, k)


@pytest.mark.parametrize("name", TRACEABLE)
@pytest.mark.parametrize("q_len, kv_len", SHAPES)
def test_traced_mask_is_the_static_mask(name, q_len, kv_len):
  q, k, _ = _oracles.random_qkv(q_len, batch=2, q_len=q_len, kv_len=kv_len)
  for level in LEVELS:
    static = np.asarray(baselines.get(name, sparsity=_static(level), block_size=BLOCK).block_mask(q, k))
    traced = baselines.get(name, sparsity=jnp.float32(level), block_size=BLOCK)
    np.testing.assert_array_equal(np.asarray(_jitted_mask(traced, q, k)), static, err_msg=f"{level=}")
    np.testing.assert_array_equal(np.asarray(traced.block_mask(q, k)), static, err_msg=f"eager {level=}")


@pytest.mark.parametrize("name", TRACEABLE)
def test_levels_share_one_compiled_program(name):
  q, k, _ = _oracles.random_qkv(0, batch=1, q_len=64)
  jitted = jax.jit(lambda policy, q, k: policy.block_mask(q, k))
  masks = [jitted(baselines.get(name, sparsity=jnp.float32(level), block_size=BLOCK), q, k) for level in (0.5, 0.9)]
  assert jitted._cache_size() == 1  # pylint: disable=protected-access
  assert int(masks[0].sum()) > int(masks[1].sum())


def test_leaf_and_structure():
  static = baselines.get("topk_block", sparsity=0.7, block_size=BLOCK)
  traced = [baselines.get("topk_block", sparsity=jnp.float32(level), block_size=BLOCK) for level in (0.7, 0.9)]
  assert jax.tree.leaves(static) == []
  assert [leaf.dtype for leaf in jax.tree.leaves(traced[0])] == [jnp.float32]
  assert jax.tree.structure(traced[0]) == jax.tree.structure(traced[1])
  assert jax.tree.structure(static) != jax.tree.structure(baselines.get("topk_block", sparsity=0.9, block_size=BLOCK))
  rebuilt = jax.tree.map(lambda leaf: leaf, traced[1])
  assert rebuilt == traced[1] and rebuilt.query_chunk == traced[1].query_chunk


def test_equal_and_hashed_by_value():
  make = lambda sparsity, **options: baselines.get("vertical_slash", sparsity=sparsity, block_size=BLOCK, **options)
  assert make(jnp.float32(0.7)) == make(jnp.float32(0.7))
  assert hash(make(jnp.float32(0.7))) == hash(make(jnp.float32(0.7)))
  assert make(jnp.float32(0.7)) != make(jnp.float32(0.9))
  assert make(jnp.float32(0.7)) != make(jnp.float32(0.7), seed=1)
  assert make(jnp.float32(0.5)) != make(0.5)  # a traced and a static policy compile differently
  assert make(0.5) == make(0.5) and hash(make(0.5)) == hash(make(0.5))
  assert {make(jnp.float32(0.7)): 1}[make(jnp.float32(0.7))] == 1


@pytest.mark.parametrize("sparsity, match", [
    (jnp.float32(1.0), "sparsity must be a number in"),
    (jnp.float32(-0.1), "sparsity must be a number in"),
    (jnp.float32(jnp.nan), "sparsity must be a number in"),
    (jnp.asarray([0.5, 0.6]), "a traced sparsity must be a float scalar"),
    (jnp.int32(0), "a traced sparsity must be a float scalar"),
])
def test_bad_traced_targets_raise_one_clear_line(sparsity, match):
  with pytest.raises(ValueError, match=match):
    baselines.get("topk_block", sparsity=sparsity)


@pytest.mark.parametrize("name", ["window", "h2o", "random"])
def test_numpy_patterns_refuse_a_traced_target(name):
  with pytest.raises(ValueError, match=f"the {name} baseline needs a static sparsity"):
    baselines.get(name, sparsity=jnp.float32(0.5))


def test_a_target_built_under_jit_is_not_checked():
  q, k, _ = _oracles.random_qkv(0, batch=1, q_len=32)
  make = jax.jit(lambda level: baselines.get("topk_block", sparsity=level, block_size=BLOCK).block_mask(q, k))
  np.testing.assert_array_equal(make(jnp.float32(0.5)),
                                baselines.get("topk_block", sparsity=0.5, block_size=BLOCK).block_mask(q, k))
