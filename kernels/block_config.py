"""The static side of block-sparse attention: block shape, causality, backend, and the backend registry.

`BlockSparseConfig` is the one frozen, hashable description of how a block-sparse call is laid out. It
owns the block-size rule and its error message, so the kernels, the attention policies, the tuner, the
checkpoint and the command line all accept exactly the same values. A backend may tighten the rule for
the hardware it compiles for (Mosaic on a TPU wants whole lanes); `BlockSparseConfig.for_platform` applies
that refinement once the platform is known. Every backend is one `Backend` line in `BACKEND_REGISTRY`:
the kernel it calls, the platforms where `backend="auto"` picks it, where it can run and whether it runs
in Pallas interpret mode elsewhere. This module imports neither JAX nor the kernels (only numpy), so flag
parsing and config validation stay cheap.

Causal masking is bottom-right aligned: query t of T sees key u of S iff u <= t + S − T. A decode step
(T new queries after S − T cached keys) is therefore the same call with T < S; a cache buffer that is
longer than its filled part is the attention policy's business (`q_positions`), not the kernels'.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np

MIN_BLOCK = 16


class BlockConfigError(ValueError):
  """A block-sparse setting (block size, backend) that no kernel accepts."""


@dataclasses.dataclass(frozen=True)
class Backend:
  """One kernel family behind `kernels.block_sparse.block_sparse_attention`.

  Attributes:
    name: the `backend=` string.
    kernel: "module:function" of a kernel taking `(q, k, v, kv_indices, kv_counts, lam, *, causal,
      block_q, block_k, sm_scale, interpret)`, or None for the jnp reference (which takes the mask).
    auto_on: platforms on which `backend="auto"` picks this backend.
    runs_on: platforms it can run on (None: any); other platforms get a clear error.
    interpret: "never", "always", or "off_native" (Pallas interpret mode off `native_platform`).
    native_platform: the platform it compiles for, if any.
    native_block_multiple: (block_q, block_k) divisors required when compiling natively.
    backward: "module:function" of a backward kernel taking `(q, k, v, out, lse, d_out, computed, *,
      causal, block_q, block_k, sm_scale, interpret)` -> (dq, dk, dv); then `kernel` must also accept
      `return_residuals=True` and return `(out, pv_skipped, lse, tile_skipped)`
      (`kernels.block_sparse_triton` documents them). None: gradients are the VJP of the jnp reference.
    supports: "module:function" of `(config, platform, head_dim, dtype) -> str | None`, why the backend
      cannot run this call here (None: it can; head_dim and dtype may be None when unknown). "auto" passes
      over a backend with a reason, naming it explicitly raises the reason. Loaded only when asked.
  """

  name: str
  kernel: str | None
  auto_on: tuple[str, ...] = ()
  runs_on: tuple[str, ...] | None = None
  interpret: str = "never"
  native_platform: str | None = None
  native_block_multiple: tuple[int, int] = (1, 1)
  backward: str | None = None
  supports: str | None = None

  def unsupported_reason(self, config: BlockSparseConfig, platform: str, head_dim: int | None = None,
                         dtype: Any = None) -> str | None:
    """Why this backend cannot run `config` on `platform` (None: it can, as far as its hook knows)."""
    if self.supports is None:
      return None
    module_name, function_name = self.supports.split(":")
    return getattr(importlib.import_module(module_name), function_name)(config, platform, head_dim, dtype)

  def interprets_on(self, platform: str) -> bool:
    return self.interpret == "always" or (self.interpret == "off_native" and platform != self.native_platform)


# Adding a backend: write kernels/block_sparse_<name>.py and add one line here (its gradients are the jnp
# reference's VJP unless it names a `backward` kernel).
_TRITON_BACKWARD = "kernels.block_sparse_backward:block_sparse_backward_triton"
# Order matters: "auto" takes the first backend for the platform whose `supports` hook has no objection.
BACKEND_REGISTRY: dict[str, Backend] = {
    backend.name: backend for backend in (
        # Hopper (sm90+) with bf16/f16, head_dim 64/128, blocks 64/128; Triton takes the rest of the GPUs.
        Backend("mosaic_gpu", "kernels.block_sparse_mosaic_gpu:block_sparse_attention_mosaic_gpu",
                auto_on=("gpu",), runs_on=("gpu",), native_platform="gpu", backward=_TRITON_BACKWARD,
                supports="kernels.block_sparse_mosaic_gpu:unsupported_reason"),
        Backend("triton", "kernels.block_sparse_triton:block_sparse_attention_triton", auto_on=("gpu",),
                runs_on=("gpu",), native_platform="gpu", backward=_TRITON_BACKWARD),
        Backend("mosaic", "kernels.block_sparse_mosaic:block_sparse_attention_mosaic", auto_on=("tpu",),
                interpret="off_native", native_platform="tpu", native_block_multiple=(8, 128)),
        Backend("interpret", "kernels.block_sparse_triton:block_sparse_attention_triton", interpret="always",
                backward=_TRITON_BACKWARD),
        Backend("reference", None, auto_on=("cpu",)),
    )
}
AUTO = "auto"


def backend_names() -> tuple[str, ...]:
  """Every accepted `backend=` value: "auto" and the registered backends."""
  return (AUTO, *BACKEND_REGISTRY)


def check_block_size(name: str, value: Any) -> int:
  """The one block-size rule: an int power of two >= MIN_BLOCK. Returns it as an int."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
    raise BlockConfigError(f"{name} must be an int power of two >= {MIN_BLOCK}; got {value!r}.")
  value = int(value)
  if value < MIN_BLOCK or value & (value - 1):
    raise BlockConfigError(f"{name} must be a power of two >= {MIN_BLOCK}; got {value}.")
  return value


def check_backend(backend: Any) -> str:
  if backend not in backend_names():
    raise BlockConfigError(f"backend must be one of {backend_names()}; got {backend!r}.")
  return backend


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
  """How a block-sparse attention call is tiled; static (hashable) under jit.

  Attributes:
    block_q, block_k: query and key block sizes, powers of two >= 16 (default 64 × 64).
    causal: bottom-right aligned token-level causal masking.
    backend: "auto" or a `BACKEND_REGISTRY` name; "auto" picks per platform at call time.
  """

  block_q: int = 64
  block_k: int = 64
  causal: bool = True
  backend: str = AUTO

  def __post_init__(self):
    object.__setattr__(self, "block_q", check_block_size("block_q", self.block_q))
    object.__setattr__(self, "block_k", check_block_size("block_k", self.block_k))
    if not isinstance(self.causal, bool):
      raise BlockConfigError(f"causal must be a bool; got {self.causal!r}.")
    check_backend(self.backend)

  @classmethod
  def square(cls, block_size: int, **fields: Any) -> BlockSparseConfig:
    """block_q = block_k = block_size."""
    return cls(block_q=block_size, block_k=block_size, **fields)

  def num_blocks(self, q_len: int, kv_len: int) -> tuple[int, int]:
    """(n_q_blocks, n_k_blocks) for a query of q_len tokens over kv_len keys."""
    return -(-q_len // self.block_q), -(-kv_len // self.block_k)

  def for_platform(self, platform: str, *, head_dim: int | None = None,
                   dtype: Any = None) -> tuple[BlockSparseConfig, Backend]:
    """Resolves "auto" on `platform` and applies the chosen backend's own rules.

    Args:
      platform: "cpu", "gpu" or "tpu".
      head_dim, dtype: of q, when known; backends with a `supports` hook may depend on them.

    Returns:
      (this config with a concrete backend name, that Backend).
    """
    name = self.backend
    if name == AUTO:
      name = next((b.name for b in BACKEND_REGISTRY.values() if platform in b.auto_on
                   and b.unsupported_reason(self, platform, head_dim, dtype) is None), "reference")
    backend = BACKEND_REGISTRY[name]
    if backend.runs_on is not None and platform not in backend.runs_on:
      raise BlockConfigError(
          f"backend={name!r} needs a {' or '.join(p.upper() for p in backend.runs_on)}, but the default "
          f"platform is {platform!r}; use backend='interpret' to run the same kernel on CPU, or 'auto'.")
    if self.backend != AUTO and (reason := backend.unsupported_reason(self, platform, head_dim, dtype)):
      raise BlockConfigError(f"backend={name!r} cannot run this call: {reason}. Use backend='auto' (it "
                             "picks a backend that can) or 'triton'.")
    if backend.native_platform == platform and not backend.interprets_on(platform):
      multiple_q, multiple_k = backend.native_block_multiple
      for field, multiple in (("block_q", multiple_q), ("block_k", multiple_k)):
        if getattr(self, field) % multiple:
          raise BlockConfigError(
              f"backend={name!r} on {platform.upper()} needs {field} to be a multiple of {multiple}; got "
              f"{field}={getattr(self, field)}.")
    return dataclasses.replace(self, backend=name), backend

  def semantics(self) -> dict[str, Any]:
    """The fields that change results (not the backend): what tuned parameters are valid for."""
    return {"block_q": self.block_q, "block_k": self.block_k, "causal": self.causal}
