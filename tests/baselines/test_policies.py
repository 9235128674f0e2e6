"""Every baseline through the policy seam: sparsity targets, causality, numerics, jit, pytrees, errors."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import afbs_jax.baselines as baselines
from afbs_jax.baselines import sparsity
from tests.baselines import _oracles

RANDOM = ("random", "sparse_sink", "reformer", "routing")


def achieved_at(policy, mask) -> np.ndarray:
  """The sparsity of a token mask by the shared definitions at the policy's level, f32 [batch, heads]."""
  mask = jnp.asarray(mask)
  if policy.granularity == "block":
    return np.asarray(sparsity.block_sparsity(mask, policy.block_size))
  return np.asarray(sparsity.token_sparsity(mask))


def achieved(policy, q, k) -> np.ndarray:
  return achieved_at(policy, policy.token_mask(q, k))


def test_names_cover_the_brief():
  assert set(baselines.NAMES) == {"window", "longformer", "sparse_transformer", "streamingllm", "h2o",
                                  "sparse_sink", "random", "topk_token", "topk_block", "reformer",
                                  "routing", "sparge_global"}
  levels = {name: baselines.get(name, sparsity=0.5).granularity for name in baselines.NAMES}
  assert {name for name, level in levels.items() if level == "token"} == {"h2o", "topk_token", "reformer",
                                                                            "routing"}


@pytest.fixture(scope="module")
def long_qkv():
  return _oracles.random_qkv(1, batch=1, q_len=512)


@pytest.mark.parametrize("name", baselines.NAMES)
@pytest.mark.parametrize("target", [0.5, 0.8])
def test_sparsity_meets_the_target(name, target, long_qkv):
  q, k, _ = long_qkv
  policy = baselines.get(name, sparsity=target, block_size=16)
  got = achieved(policy, q, k)
  assert got.shape == (1, 4)
  if name == "sparge_global":  # One τ for all heads: the mean meets the target, heads spread around it.
    assert abs(got.mean() - target) <= 0.02 and np.all(np.abs(got - target) <= 0.1)
  else:                        # Exact counting: within half a cell of the target, every head.
    cells = 528 if policy.granularity == "block" else 512 * 513 // 2
    np.testing.assert_allclose(got, target, atol=0.5 / cells + 1e-6)


@pytest.mark.parametrize("name", [name for name in baselines.NAMES if name not in ("h2o", "topk_token",
                                                                                     "reformer", "routing")])
def test_block_sparsity_at_block_32(name, long_qkv):
  q, k, _ = long_qkv
  got = achieved(baselines.get(name, sparsity=0.5, block_size=32), q, k)
  assert abs(got.mean() - 0.5) <= 0.02 and np.all(np.abs(got - 0.5) <= 0.05)


@pytest.fixture(scope="module")
def rect_qkv():
  """T < S (a prefill continuing a cache), batch 2, GQA 4/2."""
  return _oracles.random_qkv(0, batch=2, q_len=64, kv_len=128)


# The token-level baselines' eager masks are held to a jitted computation in test_chunked.py (eager selection
# against the jitted unchunked one, jitted attend against the unchunked attend at the same sparsity): here
# their eager masks would only repeat that, at a compile of their own each (2-4 s of CPU).
EAGER_CHECKED_IN_TEST_CHUNKED = ("h2o", "topk_token", "reformer", "routing")


@pytest.mark.parametrize("name", baselines.NAMES)
def test_jitted_output_is_dense_attention_under_the_token_mask(name, rect_qkv):
  q, k, v = rect_qkv
  policy = baselines.get(name, sparsity=0.6, block_size=16, backend="reference")
  leaves, treedef = jax.tree.flatten(policy)
  assert leaves == [] and treedef.unflatten([]) == policy and hash(treedef.unflatten([])) == hash(policy)
  # The policy goes through jit as an argument, as a model stores it; layer 1 checks the layer is threaded.
  # (`policy(...)` is `attend(...)[0]`; the model tests call it.)
  forward = jax.jit(lambda p, q, k, v: (*p.attend(q, k, v, layer=1), p.token_mask(q, k, layer=1)))
  out, got_sparsity, mask = (np.asarray(x) for x in forward(policy, q, k, v))
  if name not in EAGER_CHECKED_IN_TEST_CHUNKED:
    np.testing.assert_array_equal(mask, np.asarray(policy.token_mask(q, k, layer=1)))  # eager == jit
  assert mask.shape == (2, 4, 64, 128) and mask.dtype == bool
  assert not np.any(mask & ~_oracles.causal(64, 128)), "a kept entry above the causal diagonal"
  own = mask[..., np.arange(64), np.arange(64) + 64]
  assert np.all(own) or name == "sparge_global", "a query lost its own position"
  assert np.all(mask.any(axis=-1)), "a query with nothing to attend"
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, _oracles.masked_attention(q, k, v, mask), atol=1e-5, rtol=0)
  np.testing.assert_allclose(got_sparsity, achieved_at(policy, mask), atol=1e-6)


@pytest.mark.parametrize("name", RANDOM)
def test_seed_and_layer_drive_the_random_choices(name, rect_qkv):
  q, k, _ = rect_qkv
  mask = lambda seed, layer: np.asarray(baselines.get(name, sparsity=0.6, block_size=16, seed=seed)
                                        .token_mask(q, k, layer=layer))
  np.testing.assert_array_equal(mask(3, 0), mask(3, 0))
  assert np.any(mask(3, 0) != mask(4, 0)) and np.any(mask(3, 0) != mask(3, 1))


def test_q_positions_is_prefill_only(rect_qkv):
  q, k, v = rect_qkv
  with pytest.raises(NotImplementedError, match="prefill only"):
    baselines.get("window", sparsity=0.5, block_size=16)(q, k, v, layer=0, q_positions=jnp.arange(64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="dense"), r"unknown baseline 'dense'; choose one of: window, longformer"),
    (dict(name="window", sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
    (dict(name="window", sparsity=-0.2), r"sparsity must be a number in \[0, 1\)"),
    (dict(name="h2o", sparsity=float("nan")), r"sparsity must be a number in \[0, 1\)"),
    (dict(name="window", block_size=24), "block_size must be a power of two >= 16; got 24"),
    (dict(name="random", block_size=8), "block_size must be a power of two >= 16; got 8"),
    (dict(name="window", block_size=32.0), "block_size must be an int power of two >= 16"),
    (dict(name="window", seed=-1), "seed must be an int >= 0"),
    (dict(name="window", backend="cuda"), "backend must be one of"),
    (dict(name="window", n_buckets=4), "window takes no option n_buckets; its options: none"),
    (dict(name="reformer", n_buckets=5), "n_buckets must be an even int >= 2"),
    (dict(name="routing", n_clusters=0), "n_clusters must be an int >= 1"),
    (dict(name="longformer", window_per_global=0), "window_per_global must be an int >= 1"),
])
def test_bad_settings_raise_one_clear_line(kwargs, match):
  kwargs = dict(sparsity=0.5) | kwargs
  with pytest.raises(ValueError, match=match) as error:
    baselines.get(kwargs.pop("name"), **kwargs)
  assert "\n" not in str(error.value)


def test_bad_shapes_raise(rect_qkv):
  q, k, v = rect_qkv
  with pytest.raises(ValueError, match="multiple of k kv_heads"):
    baselines.get("h2o", sparsity=0.5)(q[:, :, :3], k, v, layer=0)


@pytest.fixture(scope="module")
def tiny_model():
  """(model, tokens, dense logits) of the tiny random GQA Llama."""
  from afbs_jax.model import init_random  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top

  model = init_random(tiny.MODEL, seed=0)
  tokens = np.random.default_rng(0).integers(0, 256, (1, 64))
  return model, tokens, np.asarray(model(tokens))


@pytest.mark.parametrize("name", ["streamingllm", "h2o"])
def test_in_a_model_at_zero_sparsity_is_the_dense_model(name, tiny_model):
  model, tokens, dense = tiny_model
  sparse = model.with_attention(baselines.get(name, sparsity=0.0, block_size=16))(tokens)
  np.testing.assert_allclose(np.asarray(sparse), dense, atol=1e-4, rtol=0)


BASELINES_DIR = pathlib.Path(baselines.__file__).parent
ALLOWED = ("jax", "numpy", "kernels", "afbs_jax.attention", "afbs_jax.baselines", "__future__")


def test_imports_only_the_floor_below():
  for path in BASELINES_DIR.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
               else [node.module] if isinstance(node, ast.ImportFrom) else [])
      for module in names:
        top = module.split(".")[0]
        allowed = any(module == a or module.startswith(a + ".") for a in ALLOWED)
        assert top in sys.stdlib_module_names or allowed, f"{path.name} imports {module}"
  loaded = subprocess.run(
      [sys.executable, "-c", "import sys, afbs_jax.baselines; print(' '.join(sorted(sys.modules)))"],
      capture_output=True, text=True, check=True, cwd=BASELINES_DIR.parents[1]).stdout.split()
  forbidden = [m for m in loaded if m.split(".")[:2] in (["afbs_jax", "model"], ["afbs_jax", "tuner"],
                                                         ["afbs_jax", "eval"], ["afbs_jax", "main"])]
  assert not forbidden, forbidden
