"""Hugging Face directory loading: round trips through save_pretrained, dtypes, tokenizer, clear errors."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from afbs_jax.model import load_hf
from afbs_jax.model.hf_loader import config_from_hf
from tests.model.conftest import HF_KWARGS, hf_logits, make_hf_llama, save_hf_llama

TOLERANCE = 1e-4


def test_sharded_round_trip_matches_transformers(hf_llama_dir, tokens):
  hf_model, directory = hf_llama_dir
  assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))  # Really sharded.
  model, tokenizer = load_hf(directory)
  assert tokenizer is None
  assert model.config.param_dtype == "float32"  # Follows the float32 checkpoint.
  assert model.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
  assert (model.config.num_heads, model.config.num_kv_heads) == (4, 2)
  np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(hf_model, tokens), atol=TOLERANCE, rtol=0)


def test_single_file_checkpoint(tmp_path, tokens):
  hf_model = make_hf_llama(tied=False, rope_theta=100000.0, seed=5)
  directory = save_hf_llama(hf_model, tmp_path / "single", max_shard_size="1GB")
  assert sorted(f for f in os.listdir(directory) if "safetensors" in f) == ["model.safetensors"]
  model, _ = load_hf(directory)
  assert model.config.rope_theta == 100000.0
  np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(hf_model, tokens), atol=TOLERANCE, rtol=0)


def test_bfloat16_checkpoint_loads_as_bfloat16_unless_overridden(tmp_path, tokens):
  import torch  # pylint: disable=g-import-not-at-top

  hf_model = make_hf_llama(tied=True).to(torch.bfloat16)
  directory = save_hf_llama(hf_model, tmp_path / "bf16")
  model, _ = load_hf(directory)
  assert model.config.param_dtype == "bfloat16"
  assert model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  as_f32, _ = load_hf(directory, param_dtype="float32")
  reference = hf_logits(hf_model.float(), tokens)  # The bf16 weights, computed in float32.
  np.testing.assert_allclose(np.asarray(as_f32(tokens)), reference, atol=TOLERANCE, rtol=0)
  logits = np.asarray(model(tokens))
  assert logits.dtype == np.float32
  assert np.max(np.abs(logits - reference)) < 0.05 * np.max(np.abs(reference))


def test_tokenizer_json_is_loaded(hf_llama_dir):
  tokenizers = pytest.importorskip("tokenizers")
  _, directory = hf_llama_dir
  vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  backend.save(os.path.join(directory, "tokenizer.json"))
  _, tokenizer = load_hf(directory)
  assert tokenizer.encode("hello world") == [3, 4]
  assert tokenizer.vocab_size == 5


def edit_config(directory: str, **changes) -> None:
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump(config | changes, f)


@pytest.fixture
def saved_dir(tmp_path):
  return save_hf_llama(make_hf_llama(tied=False), tmp_path / "model")


def test_missing_directory(tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    load_hf(tmp_path / "absent")


def test_missing_config(saved_dir):
  os.remove(os.path.join(saved_dir, "config.json"))
  with pytest.raises(ValueError, match="no config.json"):
    load_hf(saved_dir)


def test_missing_weights(saved_dir):
  for name in os.listdir(saved_dir):
    if "safetensors" in name:
      os.remove(os.path.join(saved_dir, name))
  with pytest.raises(ValueError, match="no weights"):
    load_hf(saved_dir)


def test_missing_shard(saved_dir):
  shard = sorted(f for f in os.listdir(saved_dir) if f.endswith(".safetensors"))[-1]
  os.remove(os.path.join(saved_dir, shard))
  with pytest.raises(ValueError, match=f"names shard '{shard}', which is missing"):
    load_hf(saved_dir)


def test_wrong_shape_names_the_tensor(saved_dir):
  edit_config(saved_dir, intermediate_size=HF_KWARGS["intermediate_size"] * 2)
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight' has shape"):
    load_hf(saved_dir)


def test_missing_tensor_is_named(saved_dir):
  edit_config(saved_dir, num_hidden_layers=3)
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.2\."):
    load_hf(saved_dir)


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="mistral"), "model_type='mistral' is not supported"),
    (dict(model_type=None), "model_type=None is not supported"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "'llama3' is not supported"),
])
def test_unsupported_architectures_are_refused(saved_dir, changes, match):
  edit_config(saved_dir, **changes)
  with pytest.raises(ValueError, match=match):
    load_hf(saved_dir)


def test_older_config_keys():
  """transformers < 5 wrote `rope_theta` and `torch_dtype` at the top level (Llama-2 checkpoints do)."""
  hf = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0,
            rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False, rope_scaling=None,
            torch_dtype="float16")
  config = config_from_hf(hf, name="llama-2-7b")
  import configs  # pylint: disable=g-import-not-at-top

  assert config == configs.get_config("llama2").model  # float16 checkpoints run in bfloat16.


def test_surplus_derived_tensors_are_ignored(saved_dir, tokens):
  """Old checkpoints store rotary inv_freq buffers; they are recomputed, not loaded."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  index_path = os.path.join(saved_dir, "model.safetensors.index.json")
  with open(index_path) as f:
    index = json.load(f)
  save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)},
            os.path.join(saved_dir, "extra.safetensors"))
  index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = "extra.safetensors"
  with open(index_path, "w") as f:
    json.dump(index, f)
  model, _ = load_hf(saved_dir)
  assert model(tokens).shape == tokens.shape + (HF_KWARGS["vocab_size"],)
