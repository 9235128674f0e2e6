"""Calibration and validation token batches for the tuner, cut from a corpus's training text.

The tuner needs one calibration input (input 0) and a few validation inputs from *different* text, all
of one length. `calibration_tokens` tokenizes the training split once and cuts consecutive, disjoint
chunks of `length` tokens: chunk 0 is the calibration input and the following chunks are validation
inputs, so no validation token ever appears in the calibration input. Only as much text as needed is
tokenized (a prefix, grown until it yields enough tokens), which keeps this fast on large corpora.
`ByteTokenizer` (UTF-8 bytes as token ids) serves models without a tokenizer of their own, such as the
random-weight `tiny` config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afbs_jax.errors import ShortInputError

# A generous characters-per-token guess for the first prefix; the prefix doubles until it is enough.
_CHARS_PER_TOKEN_GUESS = 6


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255 (no special tokens); for random-weight models with vocab >= 256."""

  vocab_size = 256
  bos_id = None
  eos_id = None

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Any) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def calibration_tokens(tokenizer: Any, text: str, *, num_inputs: int, length: int) -> np.ndarray:
  """Cuts `num_inputs` disjoint chunks of `length` tokens from `text`.

  Args:
    tokenizer: has `.encode(text) -> list[int]`.
    text: the corpus's training text.
    num_inputs: 1 calibration input + the number of validation inputs (>= 1).
    length: tokens per input (the high-fidelity length, >= 1).

  Returns:
    int32 [num_inputs, length]; row 0 is the calibration input, rows 1.. the validation inputs.

  Raises:
    ValueError: bad arguments.
    ShortInputError: `text` is too short for num_inputs × length tokens.
  """
  if not isinstance(num_inputs, (int, np.integer)) or num_inputs < 1:
    raise ValueError(f"num_inputs must be an int >= 1; got {num_inputs!r}")
  if not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"length must be an int >= 1; got {length!r}")
  needed = int(num_inputs) * int(length)
  tokens = _encode_at_least(tokenizer, text, needed)
  if tokens.size < needed:
    raise ShortInputError(
        f"the training text has {tokens.size} tokens but {num_inputs} inputs (1 calibration + "
        f"{num_inputs - 1} validation) of {length} tokens (the high-fidelity length) need {needed}; use a "
        "longer text, a shorter --high_len or fewer --num_validation")
  return tokens[:needed].reshape(int(num_inputs), int(length))


def _encode_at_least(tokenizer: Any, text: str, needed: int) -> np.ndarray:
  """Tokenizes ever longer prefixes of `text` until one yields >= needed tokens (or all is used)."""
  prefix_chars = needed * _CHARS_PER_TOKEN_GUESS
  while True:
    prefix = text[:prefix_chars]
    if len(prefix) < len(text):
      # Cut at a whitespace so the last word is not split into odd pieces.
      cut = prefix.rfind(" ")
      prefix = prefix[:cut] if cut > 0 else prefix
    tokens = np.asarray(tokenizer.encode(prefix), dtype=np.int32)
    if tokens.size >= needed or prefix_chars >= len(text):
      return tokens
    prefix_chars *= 2
