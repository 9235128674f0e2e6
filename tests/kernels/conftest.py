"""Shared fixtures for the kernel tests; the oracles themselves live in `tests.kernels._oracles`."""

from __future__ import annotations

import pytest

from tests.kernels import _oracles


@pytest.fixture
def make_qkv():
  """`make_qkv(seed, q_len=, kv_len=, heads=, kv_heads=, head_dim=, dtype=)` -> (q, k, v)."""
  return _oracles.random_qkv


@pytest.fixture
def dense_oracle():
  """float64 dense attention with bottom-right causal masking; empty rows output 0."""
  return _oracles.dense_attention


@pytest.fixture
def block_skip_oracle():
  """Brute-force block-sparse attention with the λ skip -> (out, pv_skipped)."""
  return _oracles.block_skip_attention
