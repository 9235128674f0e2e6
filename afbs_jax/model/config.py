"""The Llama architecture's hyper-parameters as one frozen dataclass (shared by model, loaders, configs)."""

from __future__ import annotations

import dataclasses
import numbers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-family decoder (Llama-2, SmolLM2).

  Attributes mirror Hugging Face's `LlamaConfig` names where one exists, so `config.json`
  maps field by field.
  """

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  # Weights are stored in this dtype; norms and softmax always run in float32.
  param_dtype: str = "bfloat16"

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "max_position_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{field} must be a positive int; got {value!r}")
    if self.param_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"param_dtype={self.param_dtype!r}; allowed: 'float32', 'bfloat16', 'float16'")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head (GQA group size)."""
    return self.num_heads // self.num_kv_heads
