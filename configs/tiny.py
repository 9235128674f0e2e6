"""A tiny random-weight Llama (GQA, float32) for tests and smoke runs; no checkpoint needed."""

from __future__ import annotations

import ml_collections

from afbs_jax.model.config import LlamaConfig
from configs import make_config

MODEL = LlamaConfig(
    name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
    tie_word_embeddings=False, param_dtype="float32")


def get_config() -> ml_collections.ConfigDict:
  return make_config(
      model=MODEL, model_format="random", model_path="",
      tune=dict(low_len=128, high_len=256, block_size=16),
      eval=dict(context=128, max_eval_tokens=1024, batch_size=1))
