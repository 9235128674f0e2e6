"""Llama-2-7B from a Hugging Face directory (pass --model_path); tuned at its full 4K context."""

from __future__ import annotations

import ml_collections

from afbs_jax.model.config import LlamaConfig
from configs import make_config

MODEL = LlamaConfig(
    name="llama-2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
    tie_word_embeddings=False, param_dtype="bfloat16")


def get_config() -> ml_collections.ConfigDict:
  return make_config(
      model=MODEL, model_format="hf", model_path="",
      tune=dict(low_len=4096, high_len=4096, block_size=64),
      eval=dict(context=4096, max_eval_tokens=0, batch_size=1, add_bos=True))
