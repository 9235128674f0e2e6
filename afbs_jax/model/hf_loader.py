"""Loads a Hugging Face Llama directory (config.json + safetensors shards + optional tokenizer).

`config.json` becomes a `LlamaConfig` (only architectures this model reproduces exactly are accepted);
the safetensors shards, found through `model.safetensors.index.json` or as a single file, are exposed as
a lazy name -> tensor mapping that `build_model` reads one tensor at a time. Safetensors are opened with
the flax framework because numpy cannot represent bfloat16.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from safetensors import safe_open

from afbs_jax.errors import InputFileError
from afbs_jax.model.config import LlamaConfig
from afbs_jax.model.llama import Llama
from afbs_jax.model.tokenizer import Tokenizer, load_hf_tokenizer
from afbs_jax.model.weights import build_model

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes or shares; skipping them loses nothing.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def _require(condition: bool, message: str) -> None:
  if not condition:  # Every requirement is on the directory the user named: a user error, not a bug.
    raise InputFileError(message)


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """RoPE base from either the transformers>=5 `rope_parameters` or the older flat keys."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  _require(rope_type == "default", f"config.json: rope type {rope_type!r} is not supported (only plain RoPE; "
                                   "Llama-3-style or linear/dynamic scaling would change the positions)")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: Mapping[str, Any], *, name: str, param_dtype: str | None = None) -> LlamaConfig:
  """Maps a Hugging Face `config.json` dict to a LlamaConfig, refusing features the model lacks.

  Args:
    hf: the parsed config.json.
    name: the LlamaConfig name (the directory's base name, usually).
    param_dtype: storage dtype; None takes "float32" for float32 checkpoints and "bfloat16" otherwise
      (float16 checkpoints such as Llama-2 run in bfloat16, whose range cannot overflow activations).
  """
  model_type = hf.get("model_type")
  _require(model_type == "llama", f"config.json: model_type={model_type!r} is not supported; expected 'llama' "
                                  f"(architectures={hf.get('architectures')})")
  _require(hf.get("hidden_act", "silu") == "silu", f"config.json: hidden_act={hf.get('hidden_act')!r}; only 'silu'")
  for flag in ("attention_bias", "mlp_bias"):
    _require(not hf.get(flag, False), f"config.json: {flag}=True is not supported (the model has no biases)")
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  _require(head_dim * heads == hf["hidden_size"],
           f"config.json: head_dim={head_dim} with {heads} heads does not tile hidden_size={hf['hidden_size']}")
  if param_dtype is None:
    stored = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    param_dtype = "float32" if stored == "float32" else "bfloat16"
  return LlamaConfig(
      name=name,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      rope_theta=_rope_theta(hf),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=hf["max_position_embeddings"],
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      param_dtype=jnp.dtype(param_dtype).name,
  )


class SafetensorsTensors(Mapping):
  """Lazy name -> jax array view over a directory's safetensors shards; each access reads one tensor."""

  def __init__(self, directory: str):
    self._directory = directory
    self._file_of = self._weight_map(directory)

  @staticmethod
  def _weight_map(directory: str) -> dict[str, str]:
    index_path = os.path.join(directory, _INDEX_FILE)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      for shard in sorted(set(weight_map.values())):
        _require(os.path.isfile(os.path.join(directory, shard)), f"{_INDEX_FILE} names shard {shard!r}, "
                                                                 f"which is missing from {directory}")
      return dict(weight_map)
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    _require(bool(shards), f"no weights in {directory}: expected {_SINGLE_FILE} or {_INDEX_FILE} with its shards "
                           "(only safetensors checkpoints are supported)")
    weight_map = {}
    for shard in shards:
      with safe_open(os.path.join(directory, shard), framework="flax") as handle:
        weight_map.update({name: shard for name in handle.keys()})
    return weight_map

  def __getitem__(self, name: str) -> jax.Array:
    with safe_open(os.path.join(self._directory, self._file_of[name]), framework="flax") as handle:
      return handle.get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)


class _Selected(Mapping):
  """A key-filtered view of a lazy mapping (drops derived or shared tensors without reading them)."""

  def __init__(self, base: Mapping, keys: list[str]):
    self._base, self._keys = base, dict.fromkeys(keys)

  def __getitem__(self, name: str) -> Any:
    if name not in self._keys:
      raise KeyError(name)
    return self._base[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)


def load_hf(path: str | os.PathLike, *, param_dtype: Any = None) -> tuple[Llama, Tokenizer | None]:
  """Loads a Hugging Face Llama checkpoint directory.

  Args:
    path: directory holding config.json, safetensors weights (sharded with an index json, or single
      files) and optionally tokenizer.json / tokenizer.model.
    param_dtype: storage dtype of the weights; None follows the checkpoint (float32 stays float32,
      anything else becomes bfloat16).

  Returns:
    (model, tokenizer): a dense-attention `Llama` and the directory's tokenizer, or None without one.
  """
  directory = os.fspath(path)
  _require(os.path.isdir(directory), f"path={directory!r} is not a directory (expected a Hugging Face model dir)")
  config_path = os.path.join(directory, "config.json")
  _require(os.path.isfile(config_path), f"no config.json in {directory}: not a Hugging Face model directory")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise InputFileError(f"{config_path} is not valid JSON ({e})") from None
  name = os.path.basename(os.path.normpath(directory))
  config = config_from_hf(hf, name=name, param_dtype=None if param_dtype is None else jnp.dtype(param_dtype).name)
  tensors = SafetensorsTensors(directory)
  keep = [k for k in tensors if not k.endswith(_DERIVED_SUFFIXES)
          and not (config.tie_word_embeddings and k == "lm_head.weight")]
  model = build_model(config, _Selected(tensors, keep))
  return model, load_hf_tokenizer(directory)
