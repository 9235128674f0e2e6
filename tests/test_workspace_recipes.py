"""WORKSPACE.md's "How to extend" recipes, run as written: a new method, backend and tuner each plug in
through their own code plus one registry entry, and then work end to end through the shared machinery."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest

import configs
from afbs_jax import checkpoint
from afbs_jax.attention import registry as method_registry
from afbs_jax.model import init_random, iter_layer_qkv
from afbs_jax.tuner import registry as tuner_registry
from afbs_jax.tuner import model_tuning
from kernels import block_config, block_sparse
from tests.kernels import _oracles

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(name: str) -> str:
  with open(os.path.join(_REPO, "WORKSPACE.md"), encoding="utf-8") as f:
    blocks = re.findall(rf"```python recipe:{name}\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1, f"WORKSPACE.md must hold exactly one `recipe:{name}` block"
  return blocks[0]


@pytest.fixture
def recipe(monkeypatch):
  """Runs a recipe in a fresh namespace; the registries it touches are restored afterwards."""
  monkeypatch.setattr(method_registry, "METHODS", dict(method_registry.METHODS))
  monkeypatch.setattr(tuner_registry, "TUNERS", dict(tuner_registry.TUNERS))
  monkeypatch.setattr(block_config, "BACKEND_REGISTRY", dict(block_config.BACKEND_REGISTRY))

  def run(name: str) -> dict:
    namespace: dict = {"__name__": f"recipe_{name}"}
    exec(compile(_recipe(name), f"WORKSPACE.md:recipe:{name}", "exec"), namespace)  # pylint: disable=exec-used
    return namespace
  return run


def _tiny_setup(method: str):
  config = configs.get_config("tiny")
  config.tune.low_len, config.tune.high_len = 64, 128
  config.tune.block_q = config.tune.block_k = 16
  config.tune.bo_iters, config.tune.warm_bo_iters = 4, 3
  config.tune.method = method
  model = init_random(config.model, seed=0)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, size=(3, 128)).astype(np.int32)
  return config, model, tokens


def test_method_recipe_tunes_checkpoints_and_deploys(recipe, tmp_path):
  namespace = recipe("method")
  method = method_registry.get_method("local_window")
  assert isinstance(method, namespace["LocalWindow"])
  config, model, tokens = _tiny_setup("local_window")
  result = model_tuning.tune_model(model, tokens, config, checkpoint_dir=str(tmp_path), progress=False,
                                   backend="reference")
  tuned = checkpoint.load_tuned(str(tmp_path))
  assert tuned.method_name == "local_window" and set(tuned.params) == {"width"}
  assert tuned.params["width"].shape == (model.config.num_layers, model.config.num_heads)
  # The tuner searched the method's own latent: width = 1 − s, every head validated within the band.
  np.testing.assert_allclose(tuned.params["width"], 1.0 - tuned.s, atol=1e-6)
  assert np.all(tuned.error <= config.tune.eps_high + 1e-6)
  assert result.layer_stats[0].launches > 0
  # The checkpoint deploys as this method's policy.
  policy = checkpoint.attention_policy(tuned, backend="reference")
  assert policy.method == method
  sparse_logits = np.asarray(model.with_attention(policy)(tokens[:1]))
  dense_logits = np.asarray(model(tokens[:1]))
  assert np.all(np.isfinite(sparse_logits))
  assert np.all(tuned.sparsity > 0)  # every head pruned something, so the logits moved, but not far
  assert not np.allclose(sparse_logits, dense_logits)
  np.testing.assert_allclose(sparse_logits, dense_logits, atol=0.5)


def test_method_recipe_mask_is_monotone_in_width(recipe):
  recipe("method")
  method = method_registry.get_method("local_window")
  q, k, _ = _oracles.random_qkv(0, batch=1, q_len=128, kv_len=128, heads=2, kv_heads=1, head_dim=8)
  blocks = block_config.BlockSparseConfig.square(16, backend="reference")
  kept = [int(np.asarray(method.block_mask(q, k, {"width": jax.numpy.full(2, w)}, blocks)
                         & block_sparse.causal_block_mask(128, 128, causal=True, block_q=16, block_k=16)).sum())
          for w in (0.0, 0.25, 0.5, 1.0)]
  assert kept[0] == 2 * 8 and kept[-1] == 2 * 36 and kept == sorted(kept)  # diagonal only … every block


def test_backend_recipe_runs_through_the_front_door(recipe):
  recipe("backend")
  assert "triton_cpu" in block_config.backend_names()
  q, k, v = _oracles.random_qkv(1, batch=1, q_len=48, kv_len=48, heads=2, kv_heads=1, head_dim=16)
  mask = np.random.default_rng(0).random((1, 2, 3, 3)) < 0.6
  ours = block_sparse.block_sparse_attention(q, k, v, mask, lam=-2.0, block_q=16, block_k=16, backend="triton_cpu")
  reference = block_sparse.block_sparse_attention(q, k, v, mask, lam=-2.0, block_q=16, block_k=16,
                                                  backend="reference")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5, rtol=1e-5)


def test_tuner_recipe_runs_through_the_registry(recipe):
  recipe("tuner")
  config, model, tokens = _tiny_setup("sparge")
  _, q, k, v = next(iter(iter_layer_qkv(model, tokens)))
  setup = model_tuning.tuning_setup(config.tune, "reference", num_validation=2)
  evaluator, afbs_config = setup.evaluator(q, k, v), setup.afbs_config
  result = tuner_registry.run_tuner(evaluator, afbs_config, tuner="random_search")
  assert result.num_calls == result.num_calls_stage1 + result.num_calls_stage3 >= 8 + 2
  assert np.all(result.error <= afbs_config.eps_high + 1e-6)
  assert set(result.params) == {"tau", "theta", "lam"}
