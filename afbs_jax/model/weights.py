"""Builds a `Llama` from tensors named and laid out as in Hugging Face checkpoints, through one table.

`NAME_TABLE` maps each Hugging Face tensor name (with `{i}` for the layer) to the module path of the
parameter it fills and to whether it is transposed on the way: HF linear weights are [out, in], flax
kernels are [in, out]. The model is first built abstractly (`nnx.eval_shape`, no memory), then every
parameter is filled tensor by tensor, so a lazy mapping streams a checkpoint with one tensor on the host
at a time. Every missing, surplus, mis-shaped or non-float tensor is reported by its name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from afbs_jax.model.config import LlamaConfig
from afbs_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """Where one checkpoint tensor goes: module path of the param, and whether HF [out, in] is transposed."""

  module_path: tuple[str | int, ...]
  transpose: bool


# Hugging Face name -> (Llama attribute path with "{i}" for the layer index, transpose to [in, out]).
NAME_TABLE: dict[str, WeightSpec] = {
    "model.embed_tokens.weight": WeightSpec(("embed_tokens", "embedding"), False),
    "model.norm.weight": WeightSpec(("norm", "weight"), False),
    "lm_head.weight": WeightSpec(("lm_head",), False),
    "model.layers.{i}.input_layernorm.weight": WeightSpec(("layers", "{i}", "input_layernorm", "weight"), False),
    "model.layers.{i}.post_attention_layernorm.weight": WeightSpec(
        ("layers", "{i}", "post_attention_layernorm", "weight"), False),
    **{f"model.layers.{{i}}.self_attn.{p}_proj.weight": WeightSpec(
        ("layers", "{i}", "self_attn", f"{p}_proj", "kernel"), True) for p in "qkvo"},
    **{f"model.layers.{{i}}.mlp.{p}_proj.weight": WeightSpec(("layers", "{i}", "mlp", f"{p}_proj", "kernel"), True)
       for p in ("gate", "up", "down")},
}


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name `build_model` needs for `config`, with its Hugging Face shape."""
  hidden, heads_dim = config.hidden_size, config.num_heads * config.head_dim
  kv_dim, inter = config.num_kv_heads * config.head_dim, config.intermediate_size
  per_layer = {
      "input_layernorm.weight": (hidden,),
      "post_attention_layernorm.weight": (hidden,),
      "self_attn.q_proj.weight": (heads_dim, hidden),
      "self_attn.k_proj.weight": (kv_dim, hidden),
      "self_attn.v_proj.weight": (kv_dim, hidden),
      "self_attn.o_proj.weight": (hidden, heads_dim),
      "mlp.gate_proj.weight": (inter, hidden),
      "mlp.up_proj.weight": (inter, hidden),
      "mlp.down_proj.weight": (hidden, inter),
  }
  shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
  for i in range(config.num_layers):
    shapes.update({f"model.layers.{i}.{suffix}": shape for suffix, shape in per_layer.items()})
  return shapes


def _spec_for(name: str) -> tuple[tuple[str | int, ...], bool]:
  """Resolves a concrete HF name ("model.layers.3.mlp.up_proj.weight") to its Llama attribute path."""
  parts = name.split(".")
  if name.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit():
    spec = NAME_TABLE[".".join(parts[:2] + ["{i}"] + parts[3:])]
    return tuple(int(parts[2]) if p == "{i}" else p for p in spec.module_path), spec.transpose
  spec = NAME_TABLE[name]
  return spec.module_path, spec.transpose


def _param_at(model: Llama, path: tuple[str | int, ...]) -> nnx.Variable:
  node: Any = model
  for step in path:
    node = node[step] if isinstance(step, int) else getattr(node, step)
  return node


def _check_tensor(name: str, tensor: Any, shape: tuple[int, ...]) -> None:
  if tuple(tensor.shape) != shape:
    raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}; the config expects {shape}")
  if not jnp.issubdtype(tensor.dtype, jnp.floating):
    raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; expected a floating-point dtype")


def build_model(config: LlamaConfig, tensors: Mapping[str, Any], *, param_dtype: Any = None) -> Llama:
  """Builds a Llama from Hugging Face-named tensors.

  Args:
    config: the architecture; its `param_dtype` is the storage dtype unless `param_dtype` overrides it.
    tensors: name -> array (numpy, jax, or anything with .shape/.dtype that `jnp.asarray` accepts) in HF
      layout; may be lazy: each value is read exactly once. Keys beyond those the config needs are an
      error (e.g. `lm_head.weight` for a tied config), since they signal a config/checkpoint mismatch.
    param_dtype: optional storage dtype overriding `config.param_dtype` (e.g. "float32").

  Returns:
    A `Llama` with dense attention whose `config.param_dtype` is the dtype actually stored.
  """
  if param_dtype is not None:
    config = dataclasses.replace(config, param_dtype=jnp.dtype(param_dtype).name)
  expected = expected_shapes(config)
  names = set(tensors.keys())
  missing, surplus = sorted(set(expected) - names), sorted(names - set(expected))
  if missing:
    raise ValueError(f"{len(missing)} tensor(s) missing for {config.name}: {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}")
  if surplus:
    raise ValueError(f"unexpected tensor(s) for {config.name} (tie_word_embeddings="
                     f"{config.tie_word_embeddings}): {surplus[:8]}{' ...' if len(surplus) > 8 else ''}")
  dtype = jnp.dtype(config.param_dtype)
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  for name, shape in expected.items():
    tensor = tensors[name]
    _check_tensor(name, tensor, shape)
    path, transpose = _spec_for(name)
    value = jnp.asarray(tensor).astype(dtype)
    _param_at(model, path).set_value(value.T if transpose else value)
    del tensor, value  # Keep at most one tensor in flight when `tensors` streams from disk.
  _check_filled(model)
  return model


def _check_filled(model: Llama) -> None:
  """Guards the table against drift from the module tree: no parameter may stay abstract."""
  abstract = [path for path, leaf in _iter_params(model) if isinstance(leaf, jax.ShapeDtypeStruct)]
  if abstract:
    raise RuntimeError(f"NAME_TABLE left parameters unfilled: {abstract}")


def _iter_params(model: Llama) -> Iterator[tuple[tuple[Any, ...], Any]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      yield path, node.get_value()


def model_tensors(model: Llama) -> dict[str, np.ndarray]:
  """The inverse of `build_model`: the model's weights as HF-named float32 numpy arrays."""
  result = {}
  for name in expected_shapes(model.config):
    path, transpose = _spec_for(name)
    value = np.asarray(_param_at(model, path).get_value(), dtype=np.float32)
    result[name] = value.T if transpose else value
  return result


def random_tensors(config: LlamaConfig, *, seed: int = 0, scale: float = 0.02) -> dict[str, np.ndarray]:
  """HF-named float32 tensors for `config`: matrices ~ N(0, scale^2), norm weights 1 (as at init)."""
  rng = np.random.default_rng(seed)
  return {name: np.ones(shape, np.float32) if len(shape) == 1
          else scale * rng.standard_normal(shape, dtype=np.float32)
          for name, shape in expected_shapes(config).items()}


def init_random(config: LlamaConfig, *, seed: int = 0) -> Llama:
  """A Llama with random weights (`random_tensors`) in `config.param_dtype`; for tests and throughput.

  Built through the same table as checkpoints, from host numpy draws, so no eager per-parameter
  initialiser runs on the device.
  """
  return build_model(config, random_tensors(config, seed=seed))
