"""SmolLM2-135M(-Instruct) from the embedded Q4_1 GGUF: the default, laptop-sized model.

Run: python -m afbs_jax.main --model=smollm2 (flags override fields, e.g. --high_len=2048).
"""

from __future__ import annotations

import ml_collections

from afbs_jax.model.config import LlamaConfig
from configs import make_config

MODEL = LlamaConfig(
    name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    tie_word_embeddings=True, param_dtype="bfloat16")


def get_config() -> ml_collections.ConfigDict:
  return make_config(
      model=MODEL, model_format="gguf", model_path="",
      # Sized so that the default run (tune all 30 layers + dense/sparse perplexity) takes minutes on a
      # 2-core CPU; on a GPU raise them (e.g. --low_len=2048 --high_len=8192 --max_eval_tokens=0).
      tune=dict(low_len=256, high_len=1024, block_size=64),
      # Evaluated at the context it was tuned at (high_len), on held-out text it never saw.
      eval=dict(context=1024, max_eval_tokens=4096, batch_size=4))
