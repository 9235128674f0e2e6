"""Tests of afbs_jax.checkpoint: round trip, atomic steps, compatibility and corruption errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from afbs_jax import checkpoint
from afbs_jax.model.config import LlamaConfig

DENSE = {"tau": 1.0, "theta": 1.0, "lam": -30.0}


def _model_config(**overrides) -> LlamaConfig:
  fields = dict(name="toy", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                num_kv_heads=2, max_position_embeddings=512, param_dtype="float32")
  return LlamaConfig(**(fields | overrides))


def _tuned(layers_done: int = 3) -> checkpoint.TunedParams:
  tuned = checkpoint.empty_tuned(3, 4, DENSE, {"model_name": "toy", "block_size": 16, "weights_hash": "ab" * 32})
  rng = np.random.default_rng(0)
  for layer in range(layers_done):
    tuned.s[layer] = rng.uniform(size=4)
    tuned.tau[layer] = 1.0 - 0.5 * tuned.s[layer]
    tuned.error[layer] = rng.uniform(0.0, 0.05, size=4)
    tuned.sparsity[layer] = rng.uniform(size=4)
    tuned.num_calls[layer] = 20 + layer
  tuned.metadata["layers_done"] = layers_done
  return tuned


def test_round_trip_keeps_arrays_and_metadata(tmp_path):
  tuned = _tuned()
  checkpoint.save_tuned(tmp_path, tuned)
  loaded = checkpoint.load_tuned(tmp_path)
  for name, array in tuned.arrays().items():
    np.testing.assert_array_equal(getattr(loaded, name), array, err_msg=name)
  assert loaded.tau.dtype == np.float32 and loaded.tau.shape == (3, 4)
  assert loaded.metadata == tuned.metadata
  assert loaded.complete and loaded.layers_done == 3


def test_empty_tuned_is_dense_equivalent():
  tuned = checkpoint.empty_tuned(2, 3, DENSE, {})
  np.testing.assert_array_equal(tuned.tau, np.ones((2, 3), np.float32))
  np.testing.assert_array_equal(tuned.lam, np.full((2, 3), -30.0, np.float32))
  assert tuned.layers_done == 0 and not tuned.complete


def test_keeps_two_newest_steps_and_loads_latest(tmp_path):
  tuned = _tuned(layers_done=0)
  for layers_done in (1, 2, 3):
    tuned.s[layers_done - 1] = 0.1 * layers_done
    tuned.metadata["layers_done"] = layers_done
    checkpoint.save_tuned(tmp_path, tuned)
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]
  loaded = checkpoint.load_tuned(tmp_path)
  assert loaded.layers_done == 3
  np.testing.assert_allclose(loaded.s[:, 0], [0.1, 0.2, 0.3], rtol=1e-6)


def test_unfinished_write_is_ignored(tmp_path):
  tuned = _tuned(layers_done=1)
  checkpoint.save_tuned(tmp_path, tuned)
  # A write killed before Orbax's final rename leaves only a temporary directory behind.
  os.makedirs(tmp_path / "2.orbax-checkpoint-tmp-1234" / "arrays")
  assert checkpoint.load_tuned(tmp_path).layers_done == 1


def test_check_compatible_accepts_matching_model():
  _tuned().check_compatible(_model_config(), 16, weights_hash="ab" * 32)


@pytest.mark.parametrize("config_overrides, block_size, weights_hash, match", [
    ({"num_layers": 4}, 16, None, "num_layers=3"),
    ({"num_heads": 8, "hidden_size": 128}, 16, None, "num_heads=4"),
    ({"name": "other"}, 16, None, "belong to model 'toy'"),
    ({}, 32, None, "block_q=16, block_k=16"),
    ({}, 16, "cd" * 32, "different weights"),
])
def test_check_compatible_rejects_other_model(config_overrides, block_size, weights_hash, match):
  with pytest.raises(ValueError, match=match):
    _tuned().check_compatible(_model_config(**config_overrides), block_size, weights_hash=weights_hash)


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_tuned(tmp_path / "nothing")
  with pytest.raises(checkpoint.CheckpointError, match="no finished checkpoint"):
    checkpoint.load_tuned(tmp_path)


@pytest.mark.parametrize("damage", ["truncate_arrays", "drop_array_metadata", "garble_json"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
  checkpoint.save_tuned(tmp_path, _tuned())
  step = tmp_path / "3"
  if damage == "truncate_arrays":
    for root, _, files in os.walk(step / "arrays"):
      for name in files:
        if os.path.basename(root) == "d":
          with open(os.path.join(root, name), "wb") as f:
            f.write(b"\0")
  elif damage == "drop_array_metadata":
    os.remove(step / "arrays" / "_METADATA")
  else:
    (step / "metadata" / "metadata").write_text('{"layers_done": ')
  with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
    checkpoint.load_tuned(tmp_path)


def test_fingerprint_is_stable_and_sensitive():
  rng = np.random.default_rng(0)
  arrays = {"a": rng.normal(size=(64, 64)).astype(np.float32), "b": np.arange(10, dtype=np.float32)}
  first = checkpoint.array_fingerprint(arrays)
  assert first == checkpoint.array_fingerprint({k: v.copy() for k, v in arrays.items()})
  changed = dict(arrays, b=arrays["b"] + 1)
  assert checkpoint.array_fingerprint(changed) != first
  reshaped = dict(arrays, a=arrays["a"].reshape(32, 128))
  assert checkpoint.array_fingerprint(reshaped) != first
  assert len(first) == 64


def test_attention_policy_rebuilds_the_tuned_method(tmp_path):
  from afbs_jax.attention import SpargeAttention  # pylint: disable=g-import-not-at-top
  from kernels.block_config import BlockSparseConfig  # pylint: disable=g-import-not-at-top
  tuned = checkpoint.empty_tuned(3, 4, DENSE, {"method": "sparge", "method_options": {"attention_sink": True},
                                               "blocks": {"block_q": 16, "block_k": 32, "causal": True}})
  tuned.tau[1] = 0.9
  checkpoint.save_tuned(tmp_path, tuned)
  policy = checkpoint.attention_policy(checkpoint.load_tuned(tmp_path), backend="reference")
  assert isinstance(policy, SpargeAttention) and policy.attention_sink
  assert policy.blocks == BlockSparseConfig(block_q=16, block_k=32, backend="reference")
  np.testing.assert_array_equal(np.asarray(policy.tau), tuned.tau)
  tuned.check_compatible(_model_config(), BlockSparseConfig(16, 32))
  with pytest.raises(ValueError, match="block_q=16, block_k=32"):
    tuned.check_compatible(_model_config(), 16)


def test_checkpoint_from_before_methods_were_named_still_loads(tmp_path):
  """The old layout: SpargeAttn's tables at the top level, a square block_size, the sink flag."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  full = lambda value: np.full((3, 4), value, np.float32)
  arrays = {"tau": full(0.9), "theta": full(0.1), "lam": full(-5.0), "s": full(0.5), "error": full(0.05),
            "sparsity": full(0.3), "num_calls": np.full(3, 7, np.int32)}
  metadata = {"model_name": "toy", "block_size": 16, "attention_sink": True, "layers_done": 3}
  with ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False)) as manager:
    manager.save(3, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                            metadata=ocp.args.JsonSave(metadata)))
    manager.wait_until_finished()
  loaded = checkpoint.load_tuned(tmp_path)
  assert loaded.method_name == "sparge" and loaded.method_options == {"attention_sink": True}
  assert set(loaded.params) == {"tau", "theta", "lam"}
  np.testing.assert_array_equal(loaded.tau, arrays["tau"])
  policy = checkpoint.attention_policy(loaded)
  assert (policy.block_q, policy.block_k, policy.attention_sink) == (16, 16, True)


@pytest.mark.parametrize("name, value, match", [
    ("tau", 1.5, r"layer 1: params.tau must lie in \[0.0, 1.0\]"),
    ("lam", 0.5, r"layer 1: params.lam must lie in \[-inf, 0.0\]"),
    ("theta", np.nan, r"theta holds NaN at \[layer, head\] \[1, 2\]"),
])
def test_tables_the_kernels_reject_are_refused_at_load(tmp_path, name, value, match):
  """Loaded tables reach the kernels traced, where `check_params` cannot see them; `load_tuned` checks."""
  tuned = _tuned()
  tuned.params[name][1, 2] = value
  checkpoint.save_tuned(tmp_path / "bad", tuned)
  with pytest.raises(checkpoint.CheckpointError, match=match):
    checkpoint.load_tuned(tmp_path / "bad")
  tuned.params[name][1, 2] = -np.inf if name == "lam" else DENSE[name]  # λ = −inf (never skip) is valid
  checkpoint.save_tuned(tmp_path / "good", tuned)
  checkpoint.load_tuned(tmp_path / "good")


def _decode_tuned(tau: float, **metadata) -> checkpoint.TunedParams:
  """Decode tables ("decode" method, τ per [layer, head]) for `_tuned()`'s model, all layers done."""
  tuned = checkpoint.empty_tuned(3, 4, {"tau": 1.0}, {
      "model_name": "toy", "weights_hash": "ab" * 32, "method": "decode",
      "method_options": {"decode_steps": 8, "attention_sink": True, "tau_rule": "top_p_candidates"},
      "blocks": {"block_q": 16, "block_k": 16, "causal": True}} | metadata)
  tuned.tau[1:] = tau
  tuned.sparsity[1:] = 0.25
  tuned.metadata["layers_done"] = 3
  return tuned


def test_decode_tables_round_trip_beside_the_prefill_ones(tmp_path):
  from afbs_jax.attention import DecodeSparseAttention  # pylint: disable=g-import-not-at-top
  checkpoint.save_tuned(tmp_path, _tuned())
  without = checkpoint.load_tuned(tmp_path)
  assert without.decode is None and checkpoint.decode_policy(without) is None  # old checkpoints load as before
  decode = _decode_tuned(0.7)
  checkpoint.save_tuned(checkpoint.decode_checkpoint_dir(tmp_path), decode)
  checkpoint.save_tuned(tmp_path, _tuned())  # a later prefill step leaves the decode section alone
  loaded = checkpoint.load_tuned(tmp_path)
  for name, array in _tuned().arrays().items():
    np.testing.assert_array_equal(getattr(loaded, name), array, err_msg=name)
  assert loaded.decode.method_name == "decode" and loaded.decode.metadata == decode.metadata
  np.testing.assert_array_equal(loaded.decode.tau, decode.tau)
  policy = checkpoint.decode_policy(loaded, backend="reference")
  assert isinstance(policy, DecodeSparseAttention)
  assert (policy.block_size, policy.sink, policy.backend) == (16, True, "reference")
  np.testing.assert_array_equal(np.asarray(policy.tau), decode.tau)
  assert checkpoint.decode_policy(loaded, backend="interpret").backend == "interpret"


@pytest.mark.parametrize("decode, error, match", [
    (_decode_tuned(0.7, weights_hash="cd" * 32), checkpoint.CheckpointMismatchError, "weights_hash"),
    (_decode_tuned(0.0), checkpoint.CheckpointError, r"tau in \(0, 1\]"),
    # Tuned before τ's rule was named (top-p since): the same τ meant fewer blocks.
    (_decode_tuned(0.7, method_options={"decode_steps": 8, "attention_sink": True}),
     checkpoint.CheckpointMismatchError, r"'inclusive' τ rule.*retune the decode phase"),
])
def test_decode_tables_that_do_not_fit_are_refused(tmp_path, decode, error, match):
  checkpoint.save_tuned(tmp_path, _tuned())
  checkpoint.save_tuned(checkpoint.decode_checkpoint_dir(tmp_path), decode)
  with pytest.raises(error, match=match):
    checkpoint.load_tuned(tmp_path)
