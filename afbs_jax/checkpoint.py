"""Orbax checkpoints of tuned per-layer, per-head sparse-attention parameters, written layer by layer.

A checkpoint holds one attention method's parameters: the method's registry name and options, its block
layout and a dict of [layers, heads] tables (SpargeAttn: tau, theta, lam), beside the tuned latent s, the
validated error and the sparsity. `attention_policy(tuned)` turns it back into a model attention policy.

Decode thresholds, when tuned (`--tune_decode`), are a second checkpoint of the same form in the
`decode/` sub-directory (`DECODE_DIR`) of the prefill's: method "decode" (`afbs_jax.attention.decode.
DecodeMethod`, per-head τ_decode), its own steps, metadata and resume. `load_tuned` attaches it as
`tuned.decode` (None for checkpoints without one, older ones included) and `decode_policy(tuned)` turns
it into the decode policy `generate` takes.

A tuning run saves one checkpoint step per finished layer (step = number of layers done) through an
Orbax `CheckpointManager` that keeps the newest two. Orbax writes each step into a temporary directory
and renames it when complete, so a run killed mid-write leaves the previous step intact and a rerun
redoes at most the one layer that was in flight. Every checkpoint holds the full [layers, heads]
arrays (untuned layers carry the dense-equivalent s = 0 parameters) plus metadata that identifies the
model (name, head counts, a fingerprint of its weights), the kernel and the tuning settings, so
loading onto a different model, head count or block size fails with a clear `CheckpointMismatchError`.

Weight fingerprint: sha256 over every parameter's path, shape, dtype and a strided sample of at most
4096 of its values (taken on device, so only the sample is transferred). It is cheap (milliseconds for
7B weights), stable across runs and loaders that produce the same arrays, and changes when any
parameter's shape or dtype changes or its values change at the sampled positions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from afbs_jax.errors import UserInputError

# Per-head traces every checkpoint holds, whatever the method.
TRACE_NAMES = ("s", "error", "sparsity")
# SpargeAttn's tables and the traces: the arrays of a checkpoint tuned with the default method.
ARRAY_NAMES = ("tau", "theta", "lam") + TRACE_NAMES
# Checkpoints written before methods were named hold SpargeAttn's tables at the top level.
_LEGACY_METHOD = "sparge"
# The decode-phase checkpoint's sub-directory, beside the prefill's numbered steps.
DECODE_DIR = "decode"
_SAMPLE_SIZE = 4096
_KEEP_STEPS = 2


class CheckpointError(UserInputError):
  """A checkpoint directory is missing, truncated or unreadable, or holds values no method accepts."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint made for another model, weights, block layout or tuning setting."""


@dataclasses.dataclass
class TunedParams:
  """Tuned sparse-attention parameters of a whole model.

  Attributes:
    params: {name: f32 [layers, heads]}, the method's parameter tables (SpargeAttn: tau, theta, lam;
      each also readable as an attribute, `tuned.tau`).
    s: f32 [layers, heads], the latent s the parameters came from.
    error: f32 [layers, heads], worst validation error at the tuned s (0 for untuned layers).
    sparsity: f32 [layers, heads], block sparsity at the tuned s on the calibration input.
    num_calls: int32 [layers], evaluate calls the tuner spent on each layer.
    metadata: JSON-serialisable dict (model, weights hash, method and its options, block layout, kernel
      version, band, fidelities, seed, library versions, layers_done, per-layer stats).
    decode: the decode-phase TunedParams stored beside these (`DECODE_DIR`), or None. `save_tuned`
      writes only these tables; the decode ones are saved to their own directory.
  """

  params: dict[str, np.ndarray]
  s: np.ndarray
  error: np.ndarray
  sparsity: np.ndarray
  num_calls: np.ndarray
  metadata: dict[str, Any]
  decode: TunedParams | None = None

  def __getattr__(self, name: str) -> np.ndarray:
    # Only reached when normal lookup fails: parameter tables read as attributes (tuned.tau).
    params = self.__dict__.get("params", {})
    if name in params:
      return params[name]
    raise AttributeError(f"{type(self).__name__} has no attribute or parameter table {name!r}")

  @property
  def num_layers(self) -> int:
    return int(self.s.shape[0])

  @property
  def num_heads(self) -> int:
    return int(self.s.shape[1])

  @property
  def method_name(self) -> str:
    return str(self.metadata.get("method", _LEGACY_METHOD))

  @property
  def method_options(self) -> dict[str, Any]:
    if "method_options" in self.metadata:
      return dict(self.metadata["method_options"])
    return {"attention_sink": bool(self.metadata.get("attention_sink", False))}

  def block_config(self, backend: str = "auto"):
    """The `BlockSparseConfig` the parameters were tuned with, running on `backend`."""
    from kernels.block_config import BlockSparseConfig  # pylint: disable=g-import-not-at-top
    blocks = self.metadata.get("blocks")
    if blocks is None:  # written before block_q and block_k were stored apart
      if "block_size" not in self.metadata:
        raise CheckpointError("tuned parameters record no block layout (metadata 'blocks')")
      blocks = {"block_q": int(self.metadata["block_size"]), "block_k": int(self.metadata["block_size"])}
    return BlockSparseConfig(**blocks, backend=backend)

  @property
  def layers_done(self) -> int:
    return int(self.metadata.get("layers_done", 0))

  @property
  def complete(self) -> bool:
    return self.layers_done == self.num_layers

  def check_compatible(self, model_config: Any, blocks: Any = None, *, weights_hash: str | None = None) -> None:
    """Raises CheckpointMismatchError unless these parameters fit `model_config` (a LlamaConfig) and `blocks`.

    Args:
      blocks: a BlockSparseConfig, a square block size (int), or None (not checked).
    """
    expected = {"num_layers": model_config.num_layers, "num_heads": model_config.num_heads}
    found = {"num_layers": self.num_layers, "num_heads": self.num_heads}
    for key, value in expected.items():
      if found[key] != value:
        raise CheckpointMismatchError(
            f"tuned parameters have {key}={found[key]} but model {model_config.name!r} has "
            f"{key}={value}; tune this model instead of loading another model's checkpoint")
    stored_name = self.metadata.get("model_name")
    if stored_name is not None and stored_name != model_config.name:
      raise CheckpointMismatchError(
          f"tuned parameters belong to model {stored_name!r}, not {model_config.name!r}")
    if blocks is not None and ("blocks" in self.metadata or "block_size" in self.metadata):
      stored = self.block_config().semantics()
      wanted = {"block_q": int(blocks), "block_k": int(blocks), "causal": True} if isinstance(
          blocks, (int, np.integer)) else blocks.semantics()
      if stored != wanted:
        describe = lambda b: ", ".join(f"{key}={value}" for key, value in b.items())
        raise CheckpointMismatchError(
            f"tuned parameters were found with {describe(stored)}, got {describe(wanted)}; the parameters "
            "depend on the block layout, so run with the blocks they were tuned with or retune")
    stored_hash = self.metadata.get("weights_hash")
    if weights_hash is not None and stored_hash is not None and stored_hash != weights_hash:
      raise CheckpointMismatchError(
          f"tuned parameters were found for weights {stored_hash[:12]}…, but the loaded weights hash "
          f"to {weights_hash[:12]}…; same architecture, different weights")

  def tables(self) -> dict[str, np.ndarray]:
    """Every [layers, heads] array: the parameter tables, then s, error and sparsity."""
    return {**self.params, **{name: getattr(self, name) for name in TRACE_NAMES}}

  def arrays(self) -> dict[str, np.ndarray]:
    """`tables()` plus num_calls [layers]."""
    return {**self.tables(), "num_calls": self.num_calls}


def attention_policy(tuned: TunedParams, backend: str = "auto") -> Any:
  """The model attention policy that runs `tuned` exactly as it was validated (method, options, blocks).

  Example: `sparse_model = model.with_attention(attention_policy(load_tuned(path)))`.
  """
  from afbs_jax.attention import registry  # pylint: disable=g-import-not-at-top
  method = registry.get_method(tuned.method_name, tuned.method_options)
  return method.policy(tuned.params, tuned.block_config(backend))


def decode_policy(tuned: TunedParams, backend: str = "auto") -> Any:
  """The decode policy of `tuned.decode` (`DecodeSparseAttention` with the tuned [layers, heads] τ on the
  tuned key block size; untuned layers keep every block), or None when no decode tables are stored.

  Example: `generate(model, prompts, n, decode_policy=decode_policy(load_tuned(path)))`.
  """
  return None if tuned.decode is None else attention_policy(tuned.decode, backend)


def decode_checkpoint_dir(path: str | os.PathLike) -> str:
  """Where the decode-phase checkpoint of the prefill checkpoint at `path` lives."""
  return os.path.join(os.fspath(path), DECODE_DIR)


def empty_tuned(num_layers: int, num_heads: int, dense_params: Mapping[str, float],
                metadata: Mapping[str, Any]) -> TunedParams:
  """TunedParams with every layer at the dense-equivalent parameters (s = 0) and layers_done = 0.

  Args:
    dense_params: {name: value at s = 0} for every parameter of the method (SpargeAttn: tau, theta, lam).
  """
  if num_layers <= 0 or num_heads <= 0:
    raise ValueError(f"num_layers and num_heads must be positive, got {num_layers=} {num_heads=}")
  shape = (num_layers, num_heads)
  full = lambda value: np.full(shape, value, np.float32)
  return TunedParams(
      params={name: full(value) for name, value in dense_params.items()},
      s=full(0.0), error=full(0.0), sparsity=full(0.0), num_calls=np.zeros(num_layers, np.int32),
      metadata={**dict(metadata), "layers_done": 0, "num_layers": num_layers, "num_heads": num_heads})


# ----------------------------------------------------------------------------------------------
# Fingerprints and versions
# ----------------------------------------------------------------------------------------------


def array_fingerprint(arrays: Mapping[str, Any]) -> str:
  """sha256 over sorted names, shapes, dtypes and strided samples of `arrays` (name -> array)."""
  digest = hashlib.sha256()
  for name in sorted(arrays):
    array = arrays[name]
    shape = tuple(int(d) for d in np.shape(array))
    size = int(np.prod(shape)) if shape else 1
    stride = max(1, size // _SAMPLE_SIZE)
    flat = array.reshape(-1) if shape else array.reshape(1)
    sample = np.asarray(flat[::stride][:_SAMPLE_SIZE]).astype(np.float32)
    digest.update(f"{name}|{shape}|{array.dtype}|".encode())
    digest.update(sample.tobytes())
  return digest.hexdigest()


def weights_fingerprint(model: Any) -> str:
  """sha256 fingerprint of a Flax NNX model's parameters (see the module docstring)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  state = nnx.state(model)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  arrays = {jax.tree_util.keystr(path): leaf for path, leaf in leaves if hasattr(leaf, "shape")}
  if not arrays:
    raise ValueError(f"model of type {type(model).__name__} has no array parameters to fingerprint")
  return array_fingerprint(arrays)


def library_versions() -> dict[str, str]:
  """Versions of the libraries whose behaviour the tuned parameters depend on."""
  versions = {}
  for package in ("jax", "jaxlib", "flax", "orbax-checkpoint", "tinygp", "numpy", "afbs-jax"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = "not installed"
  return versions


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def _manager(path: str | os.PathLike, *, read_only: bool):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else _KEEP_STEPS, create=not read_only,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(path)), options=options)


def save_tuned(path: str | os.PathLike, tuned: TunedParams) -> None:
  """Writes `tuned` as step `tuned.layers_done` under `path` (atomic; keeps the newest 2 steps)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _check_arrays(tuned)
  step = tuned.layers_done
  with _manager(path, read_only=False) as manager:
    if step in manager.all_steps():
      manager.delete(step)
    arrays = {name: np.asarray(getattr(tuned, name)) for name in TRACE_NAMES + ("num_calls",)}
    arrays["params"] = {name: np.asarray(table) for name, table in tuned.params.items()}
    manager.save(step, args=ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays),
        metadata=ocp.args.JsonSave(tuned.metadata)))
    manager.wait_until_finished()


def has_checkpoint(path: str | os.PathLike) -> bool:
  """True when `path` holds at least one finished checkpoint step."""
  if not os.path.isdir(path):
    return False
  with _manager(path, read_only=True) as manager:
    return manager.latest_step() is not None


def load_tuned(path: str | os.PathLike) -> TunedParams:
  """Loads the newest finished checkpoint under `path`.

  Raises:
    CheckpointError (a ValueError): `path` is missing, holds no finished step, the step is truncated or
      corrupt, or a parameter table holds NaN or, for SpargeAttn, values its kernel rejects.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {os.fspath(path)!r} does not exist")
  with _manager(path, read_only=True) as manager:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"no finished checkpoint under {os.fspath(path)!r}")
    try:
      _read_arrays_one_by_one(os.path.join(os.fspath(path), str(step), "arrays"))
      restored = manager.restore(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
      arrays = dict(restored["arrays"])
      metadata = dict(restored["metadata"])
      # Older checkpoints hold SpargeAttn's tables at the top level instead of under "params".
      params = arrays.pop("params", None) or {name: arrays.pop(name) for name in ("tau", "theta", "lam")}
      tuned = TunedParams(
          params={name: np.asarray(table, np.float32) for name, table in params.items()},
          **{name: np.asarray(arrays[name], np.float32) for name in TRACE_NAMES},
          num_calls=np.asarray(arrays["num_calls"]).astype(np.int32), metadata=metadata)
    except Exception as e:  # Orbax raises many types for damaged files; report them as one.
      raise CheckpointError(
          f"checkpoint step {step} under {os.fspath(path)!r} is truncated or corrupt "
          f"({type(e).__name__}: {_first_line(e)}); delete it to retune"
      ) from None
  try:
    _check_arrays(tuned)
    _check_values(tuned)
  except ValueError as e:
    raise CheckpointError(f"checkpoint under {os.fspath(path)!r} is inconsistent: {e}") from None
  if tuned.layers_done != step:
    raise CheckpointError(
        f"checkpoint step {step} under {os.fspath(path)!r} says layers_done={tuned.layers_done}")
  if tuned.method_name == "decode":
    _check_decode_rule(tuned, path)
  decode_dir = decode_checkpoint_dir(path)
  if tuned.method_name != "decode" and has_checkpoint(decode_dir):
    tuned.decode = load_tuned(decode_dir)
    _check_decode(tuned, tuned.decode, decode_dir)
  return tuned


def _check_decode_rule(decode: TunedParams, path: str | os.PathLike) -> None:
  """Decode τ tables tuned under another selection rule mean other blocks: refused, not run."""
  from kernels.decode_sparse_reference import DECODE_TAU_RULE  # pylint: disable=g-import-not-at-top
  rule = decode.method_options.get("tau_rule", "inclusive")    # stored before the rule was named: the old one
  if rule != DECODE_TAU_RULE:
    raise CheckpointMismatchError(
        f"the decode thresholds in {os.fspath(path)!r} were tuned under the {rule!r} τ rule, which means other "
        f"blocks than today's {DECODE_TAU_RULE!r} (kernels.decode_sparse_reference); retune the decode phase "
        "(afbs_jax.main --tune_decode) after moving that directory aside")


def _check_decode(tuned: TunedParams, decode: TunedParams, decode_dir: str) -> None:
  """The decode tables must be a decode method's, for the prefill tables' model, weights and heads."""
  if decode.method_name != "decode":
    raise CheckpointError(f"{decode_dir!r} holds method {decode.method_name!r}, not decode thresholds")
  if decode.s.shape != tuned.s.shape:
    raise CheckpointMismatchError(f"decode tables in {decode_dir!r} are [layers, heads]={list(decode.s.shape)}, "
                                  f"the prefill tables {list(tuned.s.shape)}; retune the decode phase")
  for key in ("model_name", "weights_hash"):
    stored, wanted = decode.metadata.get(key), tuned.metadata.get(key)
    if stored is not None and wanted is not None and stored != wanted:
      raise CheckpointMismatchError(f"decode tables in {decode_dir!r} were tuned with {key}={stored!r}, the "
                                    f"prefill tables with {wanted!r}; retune the decode phase")


def _read_arrays_one_by_one(arrays_dir: str) -> None:
  """Reads every array of a step, one at a time; raises (ValueError from tensorstore) on damage.

  Orbax reads a step's arrays concurrently; when one read fails it closes its event loop while the
  others are still in flight, and their completions print "RuntimeError: Event loop is closed"
  tracebacks after the error has been reported (orbax-checkpoint 0.12.8). Reading each array here
  first, synchronously, turns damaged files into one exception before Orbax starts.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  base = os.path.abspath(arrays_dir)
  if os.path.isfile(os.path.join(base, "manifest.ocdbt")):
    kvstore = lambda path: {"driver": "ocdbt", "base": f"file://{base}/", "path": path}
  else:  # Orbax's layout without OCDBT: one directory per array.
    kvstore = lambda path: {"driver": "file", "path": f"{base}/{path}"}
  for key in ts.KvStore.open(kvstore("")).result().list().result():
    name, _, leaf = key.decode().rpartition("/")
    if leaf in (".zarray", "zarr.json"):  # one array (zarr v2 or v3) per name
      spec = {"driver": "zarr" if leaf == ".zarray" else "zarr3", "kvstore": kvstore(f"{name}/")}
      ts.open(spec, open=True).result().read().result()


def _check_values(tuned: TunedParams) -> None:
  """Parameter tables reach the kernels traced (jit), where no range check can run: check them here."""
  for name, table in tuned.params.items():
    if np.isnan(table).any():
      where = np.argwhere(np.isnan(table))[0].tolist()
      raise ValueError(f"parameter table {name} holds NaN at [layer, head] {where}")
  if tuned.method_name == "decode":  # the decode kernel's rule: τ in (0, 1]
    tau = tuned.params.get("tau")
    if tau is None or np.any(tau <= 0) or np.any(tau > 1):
      raise ValueError("decode tables need tau in (0, 1] (1 keeps every block); got "
                       f"{'none' if tau is None else f'[{tau.min()}, {tau.max()}]'}")
  if tuned.method_name == "sparge" and set(tuned.params) == {"tau", "theta", "lam"}:
    from kernels import sparge  # pylint: disable=g-import-not-at-top  (the kernel's own range rule)
    for layer in range(tuned.num_layers):
      row = sparge.SpargeParams(**{name: table[layer] for name, table in tuned.params.items()})
      try:
        sparge.check_params(row, tuned.num_heads)
      except ValueError as e:
        raise ValueError(f"layer {layer}: {_first_line(e)}") from None


def _first_line(error: Exception, limit: int = 160) -> str:
  text = str(error).splitlines()[0] if str(error) else ""
  return text if len(text) <= limit else text[:limit] + "…"


def _check_arrays(tuned: TunedParams) -> None:
  shape = tuned.s.shape
  if len(shape) != 2:
    raise ValueError(f"s must be [layers, heads], got shape {shape}")
  if not tuned.params:
    raise ValueError("tuned parameters hold no parameter tables")
  for name, array in tuned.tables().items():
    if array.shape != shape:
      raise ValueError(f"{name} has shape {array.shape}, expected {shape} like s")
  if tuned.num_calls.shape != shape[:1]:
    raise ValueError(f"num_calls has shape {tuned.num_calls.shape}, expected ({shape[0]},)")
  if not 0 <= tuned.layers_done <= shape[0]:
    raise ValueError(f"layers_done={tuned.layers_done} outside [0, {shape[0]}]")
