"""Whole-model tuning: capture each layer's Q/K/V, tune its heads, checkpoint, move to the next layer.

`tune_model` walks the dense forward layer by layer (`afbs_jax.model.iter_layer_qkv`), builds a
`LayerEvaluator` for the configured attention method (`tune.method`, SpargeAttn by default) on the
layer's calibration and validation activations, and tunes every head of the layer at once with a tuner
from `afbs_jax.tuner.registry` (AFBS-BO warm-starts from the previous layer's s). After every layer the
parameters found so far are written as an Orbax checkpoint step, so a killed run resumes where it
stopped and redoes at most the layer that was in flight; finished layers are never retuned (their
capture still runs, since the next layer's input is the previous layer's output).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from afbs_jax import checkpoint
from afbs_jax.attention import registry as method_registry
from afbs_jax.attention.method import AttentionMethod, json_ready
from afbs_jax.tuner.evaluator import LayerEvaluator
from afbs_jax.tuner.ledger import params_at
from afbs_jax.tuner.registry import TUNERS as TUNERS
from afbs_jax.tuner.registry import get_tuner
from afbs_jax.tuner.registry import run_tuner as run_tuner
from afbs_jax.tuner.registry import sparge_grid_config as sparge_grid_config
from kernels.block_config import BlockSparseConfig

# Tuning settings that must match for a checkpoint to be resumed (anything else is bookkeeping).
_RESUME_KEYS = ("tuner", "method", "method_options", "blocks", "band", "fidelities", "latent", "acquisition",
                "seed", "kernel_version")


@dataclasses.dataclass
class LayerStats:
  """What tuning one layer cost and found.

  Attributes:
    layer: layer index.
    mean_sparsity: mean block sparsity over heads at the tuned setting.
    worst_error: worst validation error over heads.
    within_eps_high: fraction of heads whose worst validation error is <= ε_high.
    in_band: fraction of heads with ε_low <= error <= ε_high.
    num_calls: evaluate calls (each evaluates every head).
    launches, head_evaluations, tokens: sparse-kernel work summed over fidelities.
    tune_time_s: wall time of tuning (kernel calls, dense references, tuner overhead).
    capture_time_s: wall time of this layer's dense forward and Q/K/V capture.
    per_fidelity: the evaluator's counters per fidelity.
  """

  layer: int
  mean_sparsity: float
  worst_error: float
  within_eps_high: float
  in_band: float
  num_calls: int
  launches: int
  head_evaluations: int
  tokens: int
  tune_time_s: float
  capture_time_s: float
  per_fidelity: dict[str, dict[str, float]]

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class TunedModelResult:
  """Outcome of `tune_model`.

  Attributes:
    tuned: the tuned parameters ([layers, heads] arrays + metadata), as saved in the checkpoint.
    layer_stats: one `LayerStats` per layer (including layers restored from the checkpoint).
    layers_resumed: layers taken from an existing checkpoint instead of being tuned in this run.
    wall_time_s: wall time of this call.
  """

  tuned: checkpoint.TunedParams
  layer_stats: list[LayerStats]
  layers_resumed: int
  wall_time_s: float


def method_from_config(tune_config: Mapping[str, Any]) -> AttentionMethod:
  """The attention method of a config's `tune` section: `tune.method` (default "sparge"), its options
  read from the tune fields of the same names (SpargeAttn: attention_sink)."""
  method_class = method_registry.method_class(str(tune_config.get("method", "sparge")))
  names = {field.name for field in dataclasses.fields(method_class)}
  return method_class.from_options({name: _plain(tune_config[name]) for name in names if name in tune_config})


def blocks_from_config(tune_config: Mapping[str, Any], backend: str = "auto") -> BlockSparseConfig:
  """The block layout of a config's `tune` section (block_q, block_k; causal) on `backend`."""
  return BlockSparseConfig(block_q=int(tune_config.block_q), block_k=int(tune_config.block_k), causal=True,
                           backend=backend)


@dataclasses.dataclass(frozen=True)
class TuningSetup:
  """What a config's tune section fixes for every layer: the method, its block layout, AFBS-BO's settings
  (whose latent map is the method's) and the low-fidelity length."""

  method: AttentionMethod
  blocks: BlockSparseConfig
  afbs_config: Any
  low_len: int

  def evaluator(self, q: Any, k: Any, v: Any) -> LayerEvaluator:
    """The `LayerEvaluator` of one layer's captured q, k, v: [num_inputs, T_high, heads, head_dim]."""
    return LayerEvaluator(q, k, v, low_len=self.low_len, method=self.method, blocks=self.blocks,
                          latent=self.afbs_config.latent)


def tuning_setup(tune_config: Mapping[str, Any], backend: str = "auto", *,
                 num_validation: int | None = None) -> TuningSetup:
  """The `TuningSetup` of a config's `tune` section, as `tune_model` uses it for every layer."""
  method = method_from_config(tune_config)
  return TuningSetup(method=method, blocks=blocks_from_config(tune_config, backend),
                     afbs_config=afbs_config_from(tune_config, num_validation=num_validation,
                                                  latent=method.default_latent()),
                     low_len=int(tune_config.low_len))


def afbs_config_from(tune_config: Mapping[str, Any], *, num_validation: int | None = None,
                     latent: Any | None = None):
  """Builds an `AFBSConfig` from a config's `tune` section, using every field AFBSConfig knows."""
  from afbs_jax.tuner import AFBSConfig  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(AFBSConfig)}
  items = tune_config.to_dict() if hasattr(tune_config, "to_dict") else dict(tune_config)
  values = {key: _plain(value) for key, value in items.items() if key in fields}
  if num_validation is not None:
    values["num_validation"] = int(num_validation)
  if latent is not None:
    values["latent"] = latent
  return AFBSConfig(**values)


def tune_model(model: Any, calib_tokens: Any, config: Any, *, checkpoint_dir: str,
               progress: bool = True, tuner: str = "afbs", backend: str = "auto",
               on_layer_done: Callable[[LayerStats], None] | None = None) -> TunedModelResult:
  """Tunes every layer's heads of `model` on `calib_tokens`, checkpointing after each layer.

  Args:
    model: an `afbs_jax.model.Llama`.
    calib_tokens: int [num_inputs, T_high]; row 0 is the calibration input, rows 1.. validation inputs
      from disjoint text (num_inputs >= 2).
    config: a resolved experiment config with `model_name` and a `tune` section (low_len, high_len,
      block_size, eps_low, eps_high, acquisition, seed, BO/binary budgets).
    checkpoint_dir: Orbax checkpoint directory; an existing checkpoint there is resumed.
    progress: show a tqdm bar over layers.
    tuner: a name in `afbs_jax.tuner.registry.TUNERS` ("afbs", "spargeattn_grid", "s_grid").
    backend: kernel backend (see `kernels.block_config.BACKEND_REGISTRY`).
    on_layer_done: called with each newly tuned layer's stats after its checkpoint is written.

  Returns:
    TunedModelResult.

  Raises:
    ValueError: bad arguments.
    checkpoint.CheckpointMismatchError: a checkpoint in `checkpoint_dir` from another model or settings.
  """
  from afbs_jax.model import iter_layer_qkv  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  tuner_entry = get_tuner(tuner)
  tokens = np.asarray(calib_tokens)
  tune_config = config.tune
  _check_tokens(tokens, tune_config, model.config)
  setup = tuning_setup(tune_config, backend, num_validation=tokens.shape[0] - 1)
  afbs_config = setup.afbs_config
  metadata = tuning_metadata(model, config, tuner=tuner, afbs_config=afbs_config, high_len=tokens.shape[1],
                             method=setup.method, blocks=setup.blocks)
  tuned = _resume_or_start(checkpoint_dir, model, metadata, afbs_config, setup.blocks)
  layers_resumed = tuned.layers_done
  layer_stats = [LayerStats(**stats) for stats in tuned.metadata.get("layer_stats", [])]
  num_layers = model.config.num_layers
  bar = _progress_bar(num_layers, layers_resumed, enabled=progress, tuner=tuner)
  capture_start = time.perf_counter()
  for layer, q, k, v in iter_layer_qkv(model, tokens):
    if layer < tuned.layers_done:
      capture_start = time.perf_counter()
      continue
    q, k, v = jax.block_until_ready((q, k, v))
    capture_time = time.perf_counter() - capture_start
    warm_start = tuned.s[layer - 1] if layer > 0 and tuner_entry.warm_starts else None
    stats = _tune_layer(layer, setup.evaluator(q, k, v), tuned, afbs_config, warm_start=warm_start, tuner=tuner,
                        capture_time=capture_time)
    layer_stats.append(stats)
    tuned.metadata["layers_done"] = layer + 1
    tuned.metadata["layer_stats"] = [s.as_dict() for s in layer_stats]
    checkpoint.save_tuned(checkpoint_dir, tuned)
    bar.set_postfix(sparsity=f"{stats.mean_sparsity:.3f}", worst_err=f"{stats.worst_error:.4f}", refresh=False)
    bar.update(1)
    if on_layer_done is not None:
      on_layer_done(stats)
    capture_start = time.perf_counter()
  bar.close()
  return TunedModelResult(tuned=tuned, layer_stats=layer_stats, layers_resumed=layers_resumed,
                          wall_time_s=time.perf_counter() - start)


def _tune_layer(layer: int, evaluator: LayerEvaluator, tuned: checkpoint.TunedParams, afbs_config: Any, *,
                warm_start: np.ndarray | None, tuner: str, capture_time: float) -> LayerStats:
  """Tunes one layer, writes its row of `tuned` in place and returns its stats."""
  start = time.perf_counter()
  result = run_tuner(evaluator, afbs_config, tuner=tuner, warm_start=warm_start)
  tune_time = time.perf_counter() - start
  for name, values in result.params.items():
    tuned.params[name][layer] = np.asarray(values, np.float32)
  for name in checkpoint.TRACE_NAMES:
    getattr(tuned, name)[layer] = np.asarray(getattr(result, name), np.float32)
  tuned.num_calls[layer] = int(result.num_calls)
  error = np.asarray(result.error, np.float32)
  totals = evaluator.totals()
  return LayerStats(
      layer=layer, mean_sparsity=float(np.mean(result.sparsity)), worst_error=float(np.max(error)),
      within_eps_high=float(np.mean(error <= afbs_config.eps_high)),
      in_band=float(np.mean((error >= afbs_config.eps_low) & (error <= afbs_config.eps_high))),
      num_calls=int(result.num_calls), launches=int(totals["launches"]),
      head_evaluations=int(totals["head_evaluations"]), tokens=int(totals["tokens"]),
      tune_time_s=float(tune_time), capture_time_s=float(capture_time),
      per_fidelity=totals["per_fidelity"])


def tuning_metadata(model: Any, config: Any, *, tuner: str, afbs_config: Any, high_len: int,
                    method: AttentionMethod, blocks: BlockSparseConfig) -> dict[str, Any]:
  """Metadata stored with the checkpoint: what was tuned, how, and with which software."""
  tune_config = config.tune
  return {
      "model_name": str(model.config.name),
      "config_name": str(config.get("model_name", model.config.name)),
      "weights_hash": checkpoint.weights_fingerprint(model),
      "num_kv_heads": int(model.config.num_kv_heads),
      "head_dim": int(model.config.head_dim),
      "kernel_version": _kernel_version(),
      "tuner": tuner,
      "method": method.name,
      "method_options": method.options(),
      "blocks": blocks.semantics(),
      "band": [float(afbs_config.eps_low), float(afbs_config.eps_high)],
      "fidelities": {"low_len": int(tune_config.low_len), "high_len": int(high_len),
                     "num_validation": int(afbs_config.num_validation)},
      "latent": json_ready(dataclasses.asdict(afbs_config.latent)),
      "acquisition": str(afbs_config.acquisition),
      "seed": int(afbs_config.seed),
      "library_versions": checkpoint.library_versions(),
      "devices": [str(d.device_kind) for d in jax.devices()[:1]],
  }


def _resume_or_start(checkpoint_dir: str, model: Any, metadata: dict[str, Any], afbs_config: Any,
                     blocks: BlockSparseConfig) -> checkpoint.TunedParams:
  """Loads a compatible checkpoint from `checkpoint_dir` or starts an all-dense one."""
  if checkpoint.has_checkpoint(checkpoint_dir):
    tuned = checkpoint.load_tuned(checkpoint_dir)
    tuned.check_compatible(model.config, blocks, weights_hash=metadata["weights_hash"])
    # Read through TunedParams and the method so that checkpoints written before methods were named, or
    # before a method gained an option (stored without it, i.e. at its default), compare too.
    stored_options = method_registry.get_method(tuned.method_name, tuned.method_options).options()
    stored = {**tuned.metadata, "method": tuned.method_name, "method_options": stored_options,
              "blocks": tuned.block_config().semantics()}
    for key in _RESUME_KEYS:
      if stored.get(key) != metadata[key]:
        raise checkpoint.CheckpointMismatchError(
            f"the checkpoint in {checkpoint_dir!r} was tuned with {key}={stored.get(key)!r}, "
            f"this run asks for {key}={metadata[key]!r}; use another output directory or delete it")
    return tuned
  dense = {name: float(value) for name, value in params_at(afbs_config.latent, np.float32(0.0)).items()}
  return checkpoint.empty_tuned(model.config.num_layers, model.config.num_heads, dense, metadata)


def _check_tokens(tokens: np.ndarray, tune_config: Mapping[str, Any], model_config: Any) -> None:
  if tokens.ndim != 2 or tokens.shape[0] < 2:
    raise ValueError(f"calib_tokens must be int [num_inputs >= 2, T_high] (calibration + validation); "
                     f"got shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"calib_tokens must be integers; got dtype {tokens.dtype}")
  low_len, high_len = int(tune_config.low_len), tokens.shape[1]
  if not 1 <= low_len <= high_len:
    raise ValueError(f"tune.low_len must lie in [1, T_high={high_len}]; got {low_len}")
  if high_len > model_config.max_position_embeddings:
    raise ValueError(f"calib_tokens length {high_len} exceeds the model's max_position_embeddings="
                     f"{model_config.max_position_embeddings}")


def _kernel_version() -> str:
  try:
    from kernels import sparge  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "unavailable"
  return str(getattr(sparge, "KERNEL_VERSION", getattr(sparge, "__version__", "unversioned")))


def _progress_bar(total: int, initial: int, *, enabled: bool, tuner: str):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc=f"tune[{tuner}] layers", unit="layer", disable=not enabled)


def _plain(value: Any) -> Any:
  """ConfigDict values as AFBSConfig expects them (lists to tuples)."""
  return tuple(value) if isinstance(value, list) else value
