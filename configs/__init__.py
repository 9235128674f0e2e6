"""Model and experiment configs: one Python module per config, each exposing `get_config()`.

`get_config(name)` resolves the registry names ("smollm2", "llama2", "llama2-13b", "tiny") to their
modules, so entry points select a config by a flag value; `make_config` is the skeleton they share
(the tune and eval sections with their defaults).
"""

from __future__ import annotations

import importlib

import ml_collections

from afbs_jax.model.config import LlamaConfig

# Registry name -> module under configs/ (module names cannot contain "-").
CONFIG_MODULES = {
    "smollm2": "smollm2",
    "llama2": "llama2",
    "llama2-13b": "llama2_13b",
    "tiny": "tiny",
}


def get_config(name: str) -> ml_collections.ConfigDict:
  """Returns a fresh ConfigDict for the registry name `name`."""
  if name not in CONFIG_MODULES:
    raise ValueError(f"unknown config name={name!r}; allowed: {sorted(CONFIG_MODULES)}")
  return importlib.import_module(f"configs.{CONFIG_MODULES[name]}").get_config()


def make_config(*, model: LlamaConfig, model_format: str, model_path: str, tune: dict, eval: dict,
                dataset: str = "sotu") -> ml_collections.ConfigDict:  # pylint: disable=redefined-builtin
  """Builds a config from a model and per-model tune/eval overrides of the defaults below.

  Args:
    model: the architecture.
    model_format: "gguf" | "hf" | "random".
    model_path: checkpoint path ("" = the embedded default GGUF, for gguf configs).
    tune: overrides of the tuner defaults (must set low_len and high_len; `block_size` sets block_q and
      block_k; `method` names the attention method tuned, "sparge" by default).
    eval: overrides of the perplexity defaults (must set context and max_eval_tokens).
    dataset: corpus name.
  """
  if model_format not in ("gguf", "hf", "random"):
    raise ValueError(f"model_format={model_format!r}; allowed: 'gguf', 'hf', 'random'")
  config = ml_collections.ConfigDict()
  config.model_name = model.name
  config.model = model
  config.model_format = model_format
  config.model_path = model_path
  config.dataset = dataset
  tune = dict(tune)
  if "block_size" in tune:  # a square block layout, the common case
    tune["block_q"] = tune["block_k"] = tune.pop("block_size")
  config.tune = ml_collections.ConfigDict(dict(
      method="sparge", num_validation=5, block_q=64, block_k=64, attention_sink=True, local_blocks=0,
      eps_low=0.045, eps_high=0.055, acquisition="band", seed=0, bo_init=(0.2, 0.5, 0.8), bo_iters=12, binary_iters=4,
      warm_bo_iters=8, warm_binary_iters=3, decode_steps=16) | tune)
  # Also tune per-head decode thresholds after the prefill ones (decode_steps: the simulated decode steps,
  # the last positions of every calibration input; `afbs_jax.attention.decode.DecodeMethod`).
  config.tune_decode = False
  config.eval = ml_collections.ConfigDict(dict(stride=512, batch_size=1) | eval)
  # --mode=generate: the text to continue and how (temperature 0 is greedy).
  config.generate = ml_collections.ConfigDict(dict(prompt="", max_new_tokens=32, temperature=0.0, top_p=1.0))
  return config
