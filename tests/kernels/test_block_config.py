"""The one block-layout rule and the backend registry (kernels.block_config)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.block_config import (BACKEND_REGISTRY, BlockConfigError, BlockSparseConfig, backend_names,
                                  check_block_size)


@pytest.mark.parametrize("value", [16, 32, 64, 128, 1024, np.int64(64)])
def test_powers_of_two_from_16_are_accepted(value):
  assert check_block_size("block_q", value) == int(value)
  assert isinstance(check_block_size("block_q", value), int)


@pytest.mark.parametrize("value", [0, 8, 12, 48, 96, -64, 64.0, "64", True, None])
def test_other_block_sizes_are_rejected_with_one_message(value):
  with pytest.raises(BlockConfigError, match=r"block_k must be .*power of two >= 16"):
    BlockSparseConfig(block_q=64, block_k=value)


def test_config_is_hashable_and_compares_by_value():
  a, b = BlockSparseConfig(64, 128), BlockSparseConfig(block_q=64, block_k=128)
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1
  assert BlockSparseConfig.square(32) == BlockSparseConfig(32, 32)
  assert a.semantics() == {"block_q": 64, "block_k": 128, "causal": True}
  assert a.num_blocks(130, 257) == (3, 3)


@pytest.mark.parametrize("platform, expected", [("cpu", "reference"), ("gpu", "triton"), ("tpu", "mosaic")])
def test_auto_resolves_per_platform(platform, expected):
  # Without head_dim and dtype, "mosaic_gpu" (Hopper) is picked only where this process runs on one.
  if platform == "gpu" and BACKEND_REGISTRY["mosaic_gpu"].unsupported_reason(
      BlockSparseConfig(64, 128), "gpu") is None:
    expected = "mosaic_gpu"
  config, backend = BlockSparseConfig(64, 128, backend="auto").for_platform(platform)
  assert config.backend == expected == backend.name


def test_backend_refinements():
  with pytest.raises(BlockConfigError, match="needs a GPU"):
    BlockSparseConfig(backend="triton").for_platform("cpu")
  # Compiled for a TPU, Mosaic wants whole 128-lane key tiles; interpreted elsewhere it takes any block.
  with pytest.raises(BlockConfigError, match="block_k to be a multiple of 128"):
    BlockSparseConfig(64, 64, backend="mosaic").for_platform("tpu")
  BlockSparseConfig(64, 128, backend="mosaic").for_platform("tpu")
  _, mosaic = BlockSparseConfig(64, 64, backend="mosaic").for_platform("cpu")
  assert mosaic.interprets_on("cpu") and not mosaic.interprets_on("tpu")
  assert BACKEND_REGISTRY["interpret"].interprets_on("gpu")


def test_unknown_backend_and_causal_type():
  assert backend_names()[0] == "auto" and set(backend_names()[1:]) == set(BACKEND_REGISTRY)
  with pytest.raises(BlockConfigError, match="backend must be one of"):
    BlockSparseConfig(backend="cuda")
  with pytest.raises(BlockConfigError, match="causal must be a bool"):
    BlockSparseConfig(causal=1)
