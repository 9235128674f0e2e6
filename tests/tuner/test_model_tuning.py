"""Tests of tune_model on the tiny random Llama: shapes, checkpointing, resume after a crash."""

from __future__ import annotations

import numpy as np
import pytest

import configs
from afbs_jax import checkpoint
from afbs_jax.model import init_random
from afbs_jax.tuner import LatentMap
from afbs_jax.tuner import model_tuning

LOW_LEN, HIGH_LEN, BLOCK, NUM_INPUTS = 32, 64, 16, 3


class _Crash(Exception):
  pass


@pytest.fixture(scope="module")
def tiny():
  config = configs.get_config("tiny")
  config.tune.low_len, config.tune.high_len = LOW_LEN, HIGH_LEN
  config.tune.block_q = config.tune.block_k = BLOCK
  # A small budget keeps the test fast; the algorithm itself is tested in the tuner's own tests.
  config.tune.bo_iters, config.tune.warm_bo_iters = 4, 3
  model = init_random(config.model, seed=0)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, size=(NUM_INPUTS, HIGH_LEN))
  return config, model, tokens.astype(np.int32)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
  config, model, tokens = tiny
  return model_tuning.tune_model(model, tokens, config, checkpoint_dir=str(tmp_path_factory.mktemp("full")),
                                 progress=False, backend="reference")


def test_tunes_every_layer_within_band(tiny, uninterrupted):
  config, model, _ = tiny
  tuned = uninterrupted.tuned
  shape = (model.config.num_layers, model.config.num_heads)
  for name in checkpoint.ARRAY_NAMES:
    assert getattr(tuned, name).shape == shape, name
  assert tuned.complete and uninterrupted.layers_resumed == 0
  assert np.all(tuned.error <= config.tune.eps_high + 1e-6)
  assert np.all((tuned.s >= 0.0) & (tuned.s <= 1.0))
  # The deployed thresholds are the latent map of the tuned s.
  tau, theta, lam = (np.asarray(x) for x in LatentMap().to_arrays(tuned.s))
  np.testing.assert_allclose(tuned.tau, tau, rtol=1e-6)
  np.testing.assert_allclose(tuned.theta, theta, rtol=1e-6)
  np.testing.assert_allclose(tuned.lam, lam, rtol=1e-6)
  stats = uninterrupted.layer_stats
  assert [s.layer for s in stats] == [0, 1]
  for layer, layer_stats in enumerate(stats):
    assert layer_stats.num_calls == tuned.num_calls[layer] > 0
    assert layer_stats.launches == layer_stats.num_calls  # One kernel launch per evaluate call.
    assert layer_stats.head_evaluations == layer_stats.launches * model.config.num_heads
    np.testing.assert_allclose(layer_stats.mean_sparsity, tuned.sparsity[layer].mean(), rtol=1e-6)
  assert tuned.metadata["weights_hash"] == checkpoint.weights_fingerprint(model)
  assert tuned.metadata["fidelities"] == {"low_len": LOW_LEN, "high_len": HIGH_LEN, "num_validation": 2}


def test_checkpoint_on_disk_matches_result(tiny, uninterrupted, tmp_path):
  config, model, tokens = tiny
  directory = str(tmp_path / "ckpt")
  result = model_tuning.tune_model(model, tokens, config, checkpoint_dir=directory, progress=False,
                                   backend="reference")
  loaded = checkpoint.load_tuned(directory)
  for name in checkpoint.ARRAY_NAMES:
    np.testing.assert_array_equal(getattr(loaded, name), getattr(result.tuned, name), err_msg=name)
  np.testing.assert_array_equal(loaded.s, uninterrupted.tuned.s)  # Deterministic across runs.
  loaded.check_compatible(model.config, BLOCK)


def test_resume_after_crash_redoes_at_most_one_layer(tiny, uninterrupted, tmp_path):
  config, model, tokens = tiny
  directory = str(tmp_path / "ckpt")

  def crash_after_first_layer(stats):
    raise _Crash(f"killed after layer {stats.layer}")

  with pytest.raises(_Crash):
    model_tuning.tune_model(model, tokens, config, checkpoint_dir=directory, progress=False,
                            backend="reference", on_layer_done=crash_after_first_layer)
  assert checkpoint.load_tuned(directory).layers_done == 1
  retuned = []
  resumed = model_tuning.tune_model(model, tokens, config, checkpoint_dir=directory, progress=False,
                                    backend="reference", on_layer_done=lambda s: retuned.append(s.layer))
  assert retuned == [1] and resumed.layers_resumed == 1
  for name in checkpoint.ARRAY_NAMES:
    np.testing.assert_array_equal(getattr(resumed.tuned, name), getattr(uninterrupted.tuned, name),
                                  err_msg=name)
  assert [s.layer for s in resumed.layer_stats] == [0, 1]


def test_resume_refuses_other_settings(tiny, tmp_path):
  config, model, tokens = tiny
  directory = str(tmp_path / "ckpt")
  with pytest.raises(_Crash):
    model_tuning.tune_model(model, tokens, config, checkpoint_dir=directory, progress=False,
                            backend="reference", on_layer_done=lambda s: (_ for _ in ()).throw(_Crash()))
  other = configs.get_config("tiny")
  other.tune.update(dict(config.tune))
  other.tune.eps_high = 0.08
  with pytest.raises(ValueError, match="band"):
    model_tuning.tune_model(model, tokens, other, checkpoint_dir=directory, progress=False, backend="reference")
  reseeded = init_random(config.model, seed=1)
  with pytest.raises(ValueError, match="different weights"):
    model_tuning.tune_model(reseeded, tokens, config, checkpoint_dir=directory, progress=False,
                            backend="reference")


@pytest.mark.parametrize("tokens_shape, match", [((1, HIGH_LEN), "num_inputs >= 2"),
                                                 ((NUM_INPUTS, 1024), "max_position_embeddings")])
def test_bad_tokens_raise(tiny, tmp_path, tokens_shape, match):
  config, model, _ = tiny
  with pytest.raises(ValueError, match=match):
    model_tuning.tune_model(model, np.zeros(tokens_shape, np.int32), config, checkpoint_dir=str(tmp_path),
                            progress=False)


def test_unknown_tuner_raises(tiny, tmp_path):
  config, model, tokens = tiny
  with pytest.raises(ValueError, match="tuner must be one of"):
    model_tuning.tune_model(model, tokens, config, checkpoint_dir=str(tmp_path), tuner="random")


@pytest.mark.parametrize("tuner", ["s_grid", "spargeattn_grid"])
def test_grid_baselines_run_through_the_same_path(tiny, tmp_path, tuner):
  config, model, tokens = tiny
  result = model_tuning.tune_model(model, tokens, config, checkpoint_dir=str(tmp_path), progress=False,
                                   tuner=tuner, backend="reference")
  tuned = result.tuned
  assert tuned.complete and tuned.metadata["tuner"] == tuner
  assert tuned.tau.shape == (model.config.num_layers, model.config.num_heads)
  # SpargeAttn's grid searches raw (τ, θ, λ), so it has no latent s; the s-grid does.
  assert np.all(np.isnan(tuned.s)) == (tuner == "spargeattn_grid")
  assert all(stats.launches == stats.num_calls > 0 for stats in result.layer_stats)
  np.testing.assert_array_equal(checkpoint.load_tuned(str(tmp_path)).tau, tuned.tau)
