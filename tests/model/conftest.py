"""Tiny random Hugging Face Llama fixtures (torch CPU, float32) shared by the model tests.

`hf_llama(tied=...)` returns a seeded random `transformers.LlamaForCausalLM` with GQA; `hf_llama_dir`
saves one as sharded safetensors (small `max_shard_size`, so the index json path is exercised).
`config_of`/`state_dict_of` turn one into our config and HF-named numpy tensors, and
`causal_attention_numpy` is an independent float64 GQA reference. Other test packages can reuse them with
`from tests.model.conftest import make_hf_llama, save_hf_llama`.
"""

from __future__ import annotations

import numpy as np
import pytest

from afbs_jax.model import LlamaConfig

HF_KWARGS = dict(
    vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)


def make_hf_llama(*, tied: bool, seed: int = 0, **overrides):
  """A random float32 LlamaForCausalLM; norms get non-unit weights so their parity is really tested."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**(HF_KWARGS | dict(tie_word_embeddings=tied) | overrides))
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
  return model


def save_hf_llama(model, directory, *, max_shard_size: str = "40KB") -> str:
  model.save_pretrained(directory, max_shard_size=max_shard_size, safe_serialization=True)
  return str(directory)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  """float32 [batch, seq, vocab] logits of a transformers model on int tokens [batch, seq]."""
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def config_of(hf_model, *, param_dtype: str = "float32") -> LlamaConfig:
  hf = hf_model.config
  return LlamaConfig(
      name="tiny-hf", vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads, rope_theta=hf.rope_parameters["rope_theta"],
      rms_norm_eps=hf.rms_norm_eps, max_position_embeddings=hf.max_position_embeddings,
      tie_word_embeddings=hf.tie_word_embeddings, param_dtype=param_dtype)


def state_dict_of(hf_model) -> dict[str, np.ndarray]:
  tensors = {name: t.detach().float().numpy() for name, t in hf_model.state_dict().items()}
  if hf_model.config.tie_word_embeddings:
    del tensors["lm_head.weight"]  # The state dict repeats the shared embedding under this name.
  return tensors


def causal_attention_numpy(q, k, v):
  """Independent GQA reference: q [B, T, N, H], k, v [B, S, K, H] -> [B, T, N, H] (K/V repeated)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", probs / probs.sum(-1, keepdims=True), v)


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def hf_llama(request):
  return make_hf_llama(tied=request.param)


@pytest.fixture
def hf_llama_dir(hf_llama, tmp_path):
  return hf_llama, save_hf_llama(hf_llama, tmp_path / "tiny-llama")


@pytest.fixture
def tokens() -> np.ndarray:
  return np.random.default_rng(0).integers(0, HF_KWARGS["vocab_size"], size=(2, 40), dtype=np.int32)
