"""Decode-phase tuning (issue 13): `DecodeMethod` through the tuner's method seam, `pipeline.tune_decode`
on the tiny random Llama, and generation with the stored decode tables.

Shapes: inputs of 64 tokens (low fidelity 32), blocks of 16, the last 8 positions as decode steps.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

import configs
from afbs_jax import checkpoint, pipeline
from afbs_jax import main as main_lib
from afbs_jax.attention import DecodeMethod, DecodeSparseAttention, dense_reference, get_method
from afbs_jax.calibration import ByteTokenizer
from afbs_jax.model import GenerationStats, generate, init_random
from afbs_jax.tuner.evaluator import LayerEvaluator
from kernels.block_config import BlockSparseConfig

LOW_LEN, HIGH_LEN, BLOCK, STEPS = 32, 64, 16, 8
BLOCKS = BlockSparseConfig(block_q=BLOCK, block_k=BLOCK, backend="reference")


@pytest.fixture(scope="module")
def qkv():
  """Random q [2 inputs, 64, 4 heads, 16] and GQA k, v [2, 64, 2 kv heads, 16]."""
  keys = np.random.default_rng(0)
  q = keys.normal(size=(2, HIGH_LEN, 4, 16)).astype(np.float32)
  k, v = (keys.normal(size=(2, HIGH_LEN, 2, 16)).astype(np.float32) for _ in range(2))
  return q, 2.0 * k, v


def test_is_registered_with_a_linear_tau_latent():
  method = get_method("decode", {"decode_steps": STEPS, "attention_sink": False})
  assert method == DecodeMethod(decode_steps=STEPS, attention_sink=False) and method.phase == "decode"
  tau = method.default_latent().param_dict(np.array([0.0, 0.5, 1.0], np.float32))["tau"]
  np.testing.assert_allclose(np.asarray(tau), [1.0, 0.55, 0.1], rtol=1e-6)
  with pytest.raises(ValueError, match="decode_steps"):
    DecodeMethod(decode_steps=0)
  with pytest.raises(ValueError, match="tau_rule must be 'top_p_candidates'"):
    DecodeMethod(tau_rule="inclusive")


def test_scores_the_last_positions_as_decode_steps(qkv):
  q, k, v = qkv
  out, density = DecodeMethod(decode_steps=STEPS).attend(q, k, v, {"tau": np.ones(4, np.float32)}, BLOCKS)
  assert out.shape == (2, STEPS, 4, 16) and density.shape == (2, 4)
  np.testing.assert_allclose(np.asarray(out), np.asarray(dense_reference(q, k, v))[:, -STEPS:], atol=1e-5)
  np.testing.assert_allclose(np.asarray(density), 1.0)


def test_error_is_zero_at_tau_one_and_grows_as_tau_falls(qkv):
  evaluator = LayerEvaluator(*qkv, low_len=LOW_LEN, method=DecodeMethod(decode_steps=STEPS), blocks=BLOCKS)
  errors, sparsities = zip(*(evaluator.evaluate_params({"tau": tau}, "high", 0) for tau in (1.0, 0.7, 0.5, 0.05)))
  errors, sparsities = np.stack(errors), np.stack(sparsities)  # [tau, heads]
  np.testing.assert_allclose(errors[0], 0.0, atol=1e-5)
  np.testing.assert_array_equal(sparsities[0], 0.0)
  # Lower τ keeps a subset of the blocks (at 0.05 the forced ones and the best candidate: 3 of 4 blocks of 16
  # at 64 tokens).
  assert np.all(np.diff(errors.mean(axis=1)) >= 0) and np.all(errors[-1] > 0.05)
  assert np.all(np.diff(sparsities, axis=0) >= 0) and np.all(sparsities[-1] > 0)
  low_error, _ = evaluator(np.ones(4, np.float32), "low", 1)  # the latent's s = 1, on a shorter prefix
  assert low_error.shape == (4,) and np.all(low_error > 0)


@pytest.fixture(scope="module")
def tiny():
  config = configs.get_config("tiny")
  config.tune.low_len, config.tune.high_len, config.tune.num_validation = LOW_LEN, HIGH_LEN, 1
  config.tune.decode_steps, config.tune.bo_iters, config.tune.warm_bo_iters = STEPS, 4, 3
  config.tune.eps_low, config.tune.eps_high = 0.2, 0.4  # random weights: errors grow fast as τ falls
  config.tuner, config.backend, config.progress = "afbs", "reference", False
  return config, init_random(config.model, seed=0)


@pytest.fixture(scope="module")
def decode_dir(tiny, tmp_path_factory):
  """A prefill checkpoint at every layer's dense setting plus decode tables from `pipeline.tune_decode`."""
  config, model = tiny
  path = tmp_path_factory.mktemp("out") / "checkpoint"
  prefill = checkpoint.empty_tuned(2, 4, {"tau": 1.0, "theta": 0.2, "lam": -30.0}, {
      "model_name": "tiny", "weights_hash": checkpoint.weights_fingerprint(model),
      "blocks": {"block_q": BLOCK, "block_k": BLOCK, "causal": True}})
  prefill.metadata["layers_done"] = 2
  checkpoint.save_tuned(path, prefill)
  text = "Four score and seven years ago our fathers brought forth on this continent a new nation. " * 8
  result = pipeline.tune_decode(model, ByteTokenizer(), text, config,
                                checkpoint_dir=checkpoint.decode_checkpoint_dir(path))
  return path, result


def test_tune_decode_writes_per_head_tables_in_range(tiny, decode_dir):
  config, _ = tiny
  path, result = decode_dir
  tuned = checkpoint.load_tuned(path).decode
  assert tuned.complete and tuned.method_name == "decode" and result.tuned.metadata["tuner"] == "afbs"
  assert tuned.method_options == {"decode_steps": STEPS, "attention_sink": True, "tau_rule": "top_p_candidates"}
  assert tuned.tau.shape == (2, 4) and np.all((tuned.tau >= 0.1 - 1e-6) & (tuned.tau <= 1.0))
  np.testing.assert_allclose(tuned.tau, 1.0 - 0.9 * tuned.s, atol=1e-6)
  assert np.all(tuned.error <= config.tune.eps_high) and tuned.sparsity.max() > 0
  assert config.tune.method == "sparge"  # the prefill config is left as it was


def test_generate_uses_the_stored_decode_policy(decode_dir, capsys, monkeypatch):
  path, result = decode_dir
  used = []
  stats = GenerationStats(decode_steps=3, sequence_steps=3, layer_sparsity=(0.25, 0.75))
  monkeypatch.setattr(pipeline.model_lib, "generate",
                      lambda *args, **kwargs: used.append(kwargs) or ([[65, 66, 67, 68]], stats))
  values = {"model": "tiny", "mode": "generate", "output_dir": str(path.parent), "prompt": "x" * 37,
            "backend": "reference"}
  assert main_lib.run_command(values, progress=False) == 0
  err = capsys.readouterr().err
  assert "; decode: tuned tau from " in err and "(2 of 2 layers tuned, decode sparsity " in err
  assert err.strip().endswith("; 4 new tokens; measured decode sparsity 0.500 over 3 decode steps")
  assert used[0]["return_stats"] is True
  policy = used[0]["decode_policy"]
  assert isinstance(policy, DecodeSparseAttention) and (policy.block_size, policy.backend) == (BLOCK, "reference")
  np.testing.assert_array_equal(np.asarray(policy.tau), result.tuned.tau)


def test_aggressive_decode_tables_change_generation(tiny):
  """τ = 1 tables generate exactly the dense tokens (tests/model/test_generate_decode_sparse.py); tables
  that keep only the sink and local blocks change them."""
  _, model = tiny
  prompt = [np.random.default_rng(0).integers(0, 256, size=37).tolist()]
  tables = checkpoint.empty_tuned(2, 4, {"tau": 0.01}, {"method": "decode", "blocks": {
      "block_q": BLOCK, "block_k": BLOCK, "causal": True}})
  policy = checkpoint.attention_policy(tables)  # what decode_policy builds from a checkpoint's decode tables
  assert isinstance(policy, DecodeSparseAttention)
  assert generate(model, prompt, 12, decode_policy=policy) != generate(model, prompt, 12)


@pytest.mark.parametrize("overrides, match", [
    ({"tune_decode": True, "mode": "generate"}, "--tune_decode tunes, so it needs --mode=tune"),
    ({"method": "decode"}, "--method=decode tunes the decode phase"),
    ({"tune_decode": True, "decode_steps": "0"}, "--decode_steps must be >= 1"),
    ({"tune_decode": "maybe"}, "--tune_decode must be true or false"),
])
def test_cli_rejects_decode_flags_that_cannot_run(overrides, match):
  with pytest.raises(main_lib.FlagError, match=match):
    main_lib.resolve_config({"model": "tiny"} | overrides)


def test_generate_refuses_decode_tables_of_the_old_tau_rule(decode_dir, tmp_path, capsys):
  # Tables stored before τ's rule was named meant other blocks: a clear error, not a silent other policy.
  path, result = decode_dir
  output_dir = tmp_path / "out"
  shutil.copytree(path.parent, output_dir)
  decode_path = checkpoint.decode_checkpoint_dir(output_dir / path.name)
  options = {k: v for k, v in result.tuned.metadata["method_options"].items() if k != "tau_rule"}
  old = dataclasses.replace(result.tuned, metadata=result.tuned.metadata | {"method_options": options})
  shutil.rmtree(decode_path)
  checkpoint.save_tuned(decode_path, old)
  values = {"model": "tiny", "mode": "generate", "output_dir": str(output_dir), "prompt": "x" * 37,
            "backend": "reference"}
  assert main_lib.run_command(values, progress=False) == 2
  err = capsys.readouterr().err
  assert "'inclusive' τ rule" in err and "retune the decode phase" in err
