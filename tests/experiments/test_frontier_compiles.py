"""experiments.frontier compiles `generate` once per prefill method, whatever the level: its policies carry
the level as a traced target, and a model with such a policy reuses the jitted prefill."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from afbs_jax import baselines
from afbs_jax.calibration import ByteTokenizer
from afbs_jax.data import tasks as data_tasks
from afbs_jax.model import generate, generation, init_random
from experiments import frontier

BLOCK = 16


@pytest.fixture(scope="module")
def model():
  return init_random(configs.get_config("tiny").model, seed=0)


def _prefill_policy(method: str, level: float):
  bench = types.SimpleNamespace(setting=types.SimpleNamespace(block_size=BLOCK), backend="auto")
  prefill, decode, _ = frontier._policies(bench, frontier._spec("prefill", method, level), {}, 70)  # pylint: disable=protected-access
  assert decode is None
  return prefill


@pytest.mark.parametrize("method", frontier.PREFILL_METHODS)
def test_frontier_levels_are_one_traced_policy(method):
  low, high = _prefill_policy(method, 0.5), _prefill_policy(method, 0.9)
  assert jax.tree.structure(low) == jax.tree.structure(high)
  assert [float(leaf) for leaf in jax.tree.leaves(high)] == [float(np.float32(0.9))]
  assert low != high and low == _prefill_policy(method, 0.5)  # `measured` memoises by policy


def test_generate_at_a_second_level_compiles_nothing(model):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 256, size=length).tolist() for length in (70, 61)]
  answers = lambda level: generate(model.with_attention(_prefill_policy("topk_block", level)), prompts, 4,
                                   pad_to=80)
  first = answers(0.5)
  compiled = (generation._prefill_step._cache_size(), generation._decode_loop._cache_size())  # pylint: disable=protected-access
  second = answers(0.9)
  assert (generation._prefill_step._cache_size(), generation._decode_loop._cache_size()) == compiled  # pylint: disable=protected-access
  static = baselines.get("topk_block", sparsity=float(jnp.float32(0.9)), block_size=BLOCK)
  assert second == generate(model.with_attention(static), prompts, 4, pad_to=80)
  assert len(first) == len(second) == 2


def test_decode_levels_share_the_decode_loop(model):
  """decode_topk's budget is an int32 table leaf of `DecodeSparseAttention`: a new level (a new top_k)
  reuses the compiled decode loop too."""
  bench = types.SimpleNamespace(setting=types.SimpleNamespace(block_size=BLOCK), backend="auto")
  policy = lambda level: frontier._policies(bench, frontier._spec("decode", frontier.DECODE_METHOD, level),  # pylint: disable=protected-access
                                            {}, 400)[1]   # budgets of a 400-token prompt
  low, high = policy(0.5), policy(0.9)
  assert int(low.top_k) != int(high.top_k)
  prompts = [np.random.default_rng(1).integers(0, 256, size=70).tolist()]
  generate(model, prompts, 4, pad_to=80, decode_policy=low)
  compiled = generation._decode_loop._cache_size()  # pylint: disable=protected-access
  generate(model, prompts, 4, pad_to=80, decode_policy=high)
  assert generation._decode_loop._cache_size() == compiled  # pylint: disable=protected-access


def test_tasks_of_one_length_share_compiled_programs(model):
  """Every batch of a length is padded to the length's prompt size, so the second task (other prompts,
  other longest prompt) reuses the first task's prefill and decode programs."""
  tokenizer = ByteTokenizer()
  bench = types.SimpleNamespace(setting=types.SimpleNamespace(block_size=BLOCK), backend="auto", model=model,
                                tokenizer=tokenizer)
  where = {"task": None, "length": 480, "num_samples": 3}
  spec = frontier._spec(frontier.DENSE, frontier.DENSE, None)   # pylint: disable=protected-access
  score = frontier._cell   # pylint: disable=protected-access
  programs = lambda: (generation._prefill_step._cache_size(), generation._decode_loop._cache_size())  # pylint: disable=protected-access
  cells = []
  for task in ("niah_single", "variable_tracking"):
    samples = data_tasks.make_samples(task, 480, 3, 0, tokenizer)   # longest 480 and 478
    cells.append(score(bench, samples, where | {"task": task}, spec, {}, None, {}, 2, pad_to=480))
    if len(cells) == 1:
      compiled = programs()
  assert programs() == compiled
  assert [cell["prompt_tokens"] for cell in cells] == [480, 478]
  assert all(len(cell["correct"]) == 3 for cell in cells)


def test_prefill_sparsity_is_measured_on_the_lengths_common_prefix(model):
  """The first prompt's sparsity is measured on `measure_len` tokens (what every prompt of the length has),
  so its program too is shared across tasks; without it, on the whole first prompt."""
  tokenizer = ByteTokenizer()
  measured_at = []
  record = lambda policy, length, tokens: measured_at.append(length) or {"sparsity": 0.5}
  bench = types.SimpleNamespace(setting=types.SimpleNamespace(block_size=BLOCK), backend="auto", model=model,
                                tokenizer=tokenizer, sparsity=record)
  spec = frontier._spec("prefill", "topk_block", 0.5)   # pylint: disable=protected-access
  score = frontier._cell   # pylint: disable=protected-access
  samples = data_tasks.make_samples("niah_single", 480, 1, 0, tokenizer)
  where = {"task": "niah_single", "length": 480, "num_samples": 1}
  cell = score(bench, samples, where, spec, {}, None, {}, 1, pad_to=480, measure_len=476)
  score(bench, samples, where, spec, {}, None, {}, 1)
  assert measured_at == [476, len(samples[0].tokens)] and cell["prefill_sparsity"] == 0.5
