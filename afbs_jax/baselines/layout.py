"""The causal geometry every baseline selects on, at token (block = 1) or block granularity.

A grid cell is a token pair (t, u) or a (query block, key block) tile. Causal masking is bottom-right
aligned: query t sees key u iff u <= t + S − T, so a tile is causal-valid iff it holds at least one such
pair (exactly `kernels.block_index.causal_block_mask`). Everything here depends only on the static shapes,
so it is numpy, computed once while tracing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Layout(NamedTuple):
  """The grid of one (T, S, block) call.

  Attributes:
    valid: bool [rows, cols], causal-valid cells.
    distance: int [rows, cols], how many cells back from the row's last visible cell (0 is the most
      recent; negative above the causal boundary). A row's last visible cell holds the key its last query
      sees last.
    diagonal: bool [rows, cols], cells holding a query's own position (u = t + S − T); every baseline keeps
      them, so no query row is ever left empty.
  """

  valid: np.ndarray
  distance: np.ndarray
  diagonal: np.ndarray

  @property
  def columns(self) -> np.ndarray:
    """int [1, cols], the key cell index of every column."""
    return np.arange(self.valid.shape[1])[None, :]


def layout(q_len: int, kv_len: int, block: int) -> Layout:
  """The Layout of T = q_len queries over S = kv_len keys cut into `block` × `block` cells."""
  rows, cols = math.ceil(q_len / block), math.ceil(kv_len / block)
  offset = kv_len - q_len
  last_query = np.minimum((np.arange(rows) + 1) * block, q_len) - 1
  # Floor division keeps rows that see nothing (S < T) at a negative last cell, hence all-invalid.
  last_cell = (last_query + offset) // block
  distance = last_cell[:, None] - np.arange(cols)[None, :]
  queries = np.arange(q_len)
  own_key = queries + offset
  seen = own_key >= 0
  diagonal = np.zeros((rows, cols), dtype=bool)
  diagonal[queries[seen] // block, own_key[seen] // block] = True
  return Layout(valid=distance >= 0, distance=distance, diagonal=diagonal)


def token_rows(q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Per query row at token level: (valid keys, own-position keys), int [T] each; the row sums of
  `layout(q_len, kv_len, 1)`'s valid and diagonal without building its [T, S] arrays."""
  own_key = np.arange(q_len) + kv_len - q_len
  return np.clip(own_key + 1, 0, kv_len), (own_key >= 0).astype(np.int64)


def token_valid(q_len: int, kv_len: int, xp=np):
  """bool [T, S], `layout(q_len, kv_len, 1).valid` without its int [T, S] distance; xp=jnp builds it on
  the device (inside jit a fused iota comparison rather than a [T, S] constant)."""
  return xp.arange(kv_len)[None, :] <= xp.arange(q_len)[:, None] + (kv_len - q_len)
