"""Tokenizers for the supported checkpoints, all behind one small `Tokenizer` wrapper.

Every tokenizer is a `tokenizers.Tokenizer` underneath, whatever it was built from: a Hugging Face
`tokenizer.json`, a SentencePiece `tokenizer.model`, or the vocabulary a GGUF file stores as metadata
(byte-level BPE such as GPT-2's and SmolLM2's, or SentencePiece BPE such as Llama-2's). The wrapper
exposes only what the rest of the package needs: `encode` (never adds BOS; the caller decides),
`decode`, `vocab_size`, `bos_id` and `eos_id`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import json
import os
from typing import Any
import warnings

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# llama.cpp's token types (`tokenizer.ggml.token_type`, same numbering as SentencePiece's).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# How text is split into words before BPE, keyed by llama.cpp's `tokenizer.ggml.pre`. GPT-2's
# regex is what `ByteLevel(use_regex=True)` applies; SmolLM's vocabulary was learned with every
# digit split off first (its `tokenizer.json` has `Digits(individual_digits=True)`, llama.cpp's
# "smollm" pre-type does the same).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> list[pre_tokenizers.PreTokenizer]:
  return [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


def _smollm_split() -> list[pre_tokenizers.PreTokenizer]:
  return [pre_tokenizers.Digits(individual_digits=True), *_gpt2_split()]


def _llama3_split() -> list[pre_tokenizers.PreTokenizer]:
  return [
      pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ]


_BYTE_LEVEL_SPLITS = {
    "default": _gpt2_split,
    "gpt2": _gpt2_split,
    "smollm": _smollm_split,
    "llama3": _llama3_split,
    "llama-v3": _llama3_split,
    "llama-bpe": _llama3_split,
}


class Tokenizer:
  """Text <-> token ids.

  Attributes:
    backend: the wrapped `tokenizers.Tokenizer`.
    bos_id: id of the beginning-of-sequence token, or None when the vocabulary has none.
    eos_id: id of the end-of-sequence token, or None when the vocabulary has none.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None = None, eos_id: int | None = None):
    if not isinstance(backend, tokenizers.Tokenizer):
      raise ValueError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
    self.backend = backend
    self.bos_id = bos_id
    self.eos_id = eos_id

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (added tokens included)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS is added."""
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}")
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids` (special tokens are kept)."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


# ------------------------------------------------------------------------------------------------
# Builders shared by the GGUF and Hugging Face paths.
# ------------------------------------------------------------------------------------------------


def byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[str] | Sequence[tuple[str, str]],
    *,
    pre: str = "gpt2",
    special_tokens: Sequence[str] = (),
) -> tokenizers.Tokenizer:
  """A GPT-2-style byte-level BPE tokenizer.

  Args:
    tokens: the vocabulary, token i spelled in GPT-2's byte-to-unicode alphabet.
    merges: BPE merges, best first, as "left right" strings or (left, right) pairs.
    pre: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`); unknown names fall back to GPT-2's
      split with a warning.
    special_tokens: tokens matched whole in the input text (e.g. "<|im_start|>").
  """
  if pre not in _BYTE_LEVEL_SPLITS:
    warnings.warn(f"Unknown byte-level pre-tokenizer {pre!r}; splitting words the GPT-2 way. "
                  f"Known: {sorted(_BYTE_LEVEL_SPLITS)}.", stacklevel=2)
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  vocab = {_byte_level_spelling(token, alphabet): index for index, token in enumerate(tokens)}
  merge_pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False))
  backend.pre_tokenizer = pre_tokenizers.Sequence(_BYTE_LEVEL_SPLITS.get(pre, _gpt2_split)())
  backend.decoder = decoders.ByteLevel()
  # A special token spelled outside the byte alphabet is a mislabelled one BPE could never produce.
  _add_special_tokens(backend, [t for t in special_tokens if set(t) <= alphabet])
  return backend


def _byte_level_spelling(token: str, alphabet: set[str]) -> str:
  """`token` in the byte-to-unicode alphabet (some files store a few tokens as raw text)."""
  if set(token) <= alphabet:
    return token
  byte_to_char = _byte_to_unicode()
  return "".join(byte_to_char[b] for b in token.encode("utf-8"))


def _byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for byte in range(256):
    if byte in printable:
      table[byte] = chr(byte)
    else:
      table[byte] = chr(256 + extra)
      extra += 1
  return table


def sentencepiece_bpe(
    pieces: Sequence[str],
    scores: Sequence[float],
    *,
    unk_id: int,
    special_tokens: Sequence[str] = (),
    add_dummy_prefix: bool = True,
) -> tokenizers.Tokenizer:
  """A SentencePiece BPE tokenizer (Llama-2 style) rebuilt as a `tokenizers` BPE with byte fallback.

  SentencePiece BPE merges the pair whose merged piece scores highest; here the merges are listed in
  that order, so the greedy BPE of `tokenizers` reproduces SentencePiece's segmentation.

  Args:
    pieces: the vocabulary, "▁" standing for a space, byte pieces spelled "<0x0A>".
    scores: one score per piece (higher merges first).
    unk_id: id of the unknown piece.
    special_tokens: pieces matched whole in the input text (control pieces such as "<s>").
    add_dummy_prefix: whether a "▁" is prepended to the text (SentencePiece's default).
  """
  if len(pieces) != len(scores):
    raise ValueError(f"pieces and scores must have the same length, got {len(pieces)} and {len(scores)}")
  vocab = {piece: index for index, piece in enumerate(pieces)}
  merges = _merges_from_scores(vocab, dict(zip(pieces, scores)))
  model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id], fuse_unk=True, byte_fallback=True)
  backend = tokenizers.Tokenizer(model)
  # A normalizer, not `Metaspace`: Metaspace skips the prefix when the text already starts with a
  # space, where SentencePiece still adds one.
  prefix = [normalizers.Prepend("▁")] if add_dummy_prefix else []
  backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
  strip_prefix = [decoders.Strip(content=" ", left=1, right=0)] if add_dummy_prefix else []
  backend.decoder = decoders.Sequence(
      [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip_prefix])
  _add_special_tokens(backend, special_tokens)
  return backend


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
  """Every split of a piece into two pieces of the vocabulary, best-scoring merged piece first."""
  merges = []
  for piece, score in scores.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((-score, vocab[left], vocab[right], left, right))
  merges.sort()
  return [(left, right) for *_, left, right in merges]


def _add_special_tokens(backend: tokenizers.Tokenizer, special_tokens: Sequence[str]) -> None:
  if special_tokens:
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special_tokens])


# ------------------------------------------------------------------------------------------------
# GGUF metadata.
# ------------------------------------------------------------------------------------------------


def gguf_metadata(reader: Any, prefix: str = "") -> dict[str, Any]:
  """`{key: value}` of a `gguf.GGUFReader`'s fields whose key starts with `prefix`."""
  return {key: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}


def tokenizer_from_gguf(source: Any) -> Tokenizer:
  """Rebuilds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.

  Args:
    source: a `gguf.GGUFReader`, or a mapping of metadata keys to decoded values.

  Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE: GPT-2, SmolLM2, Llama-3) and "llama"
  (SentencePiece BPE with byte fallback: Llama-2).
  """
  metadata = gguf_metadata(source, "tokenizer.") if hasattr(source, "fields") else dict(source)
  kind = metadata.get("tokenizer.ggml.model")
  tokens = metadata.get("tokenizer.ggml.tokens")
  if tokens is None:
    raise ValueError("GGUF metadata has no tokenizer.ggml.tokens; the file carries no vocabulary")
  tokens = [str(t) for t in tokens]
  token_types = list(metadata.get("tokenizer.ggml.token_type") or [])
  special = [t for t, kind_ in zip(tokens, token_types) if kind_ in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
  if kind == "gpt2":
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
      raise ValueError("GGUF tokenizer.ggml.model='gpt2' needs tokenizer.ggml.merges, which the file lacks")
    backend = byte_level_bpe(tokens, [str(m) for m in merges], pre=str(metadata.get("tokenizer.ggml.pre", "default")),
                             special_tokens=special)
  elif kind == "llama":
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
      raise ValueError("GGUF tokenizer.ggml.model='llama' needs tokenizer.ggml.scores, which the file lacks")
    backend = sentencepiece_bpe(
        tokens, [float(s) for s in scores], unk_id=int(metadata.get("tokenizer.ggml.unknown_token_id", 0)),
        special_tokens=special, add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
  else:
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2', 'llama'")
  return Tokenizer(backend, bos_id=_optional_int(metadata.get("tokenizer.ggml.bos_token_id")),
                   eos_id=_optional_int(metadata.get("tokenizer.ggml.eos_token_id")))


def _optional_int(value: Any) -> int | None:
  return None if value is None else int(value)


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories.
# ------------------------------------------------------------------------------------------------


def load_hf_tokenizer(directory: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer of a Hugging Face checkpoint directory, or None when it has none.

  Reads `tokenizer.json` when present, else a SentencePiece `tokenizer.model` (BPE models only).
  BOS/EOS come from `tokenizer_config.json`, then `config.json`, then the SentencePiece model.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise ValueError(f"directory must be an existing directory, got {directory!r}")
  json_path = os.path.join(directory, "tokenizer.json")
  spm_path = os.path.join(directory, "tokenizer.model")
  if os.path.isfile(json_path):
    backend = tokenizers.Tokenizer.from_file(json_path)
    default_bos = default_eos = None
  elif os.path.isfile(spm_path):
    backend, default_bos, default_eos = _sentencepiece_file_tokenizer(spm_path)
  else:
    return None
  bos_id, eos_id = _special_ids_from_configs(directory, backend)
  return Tokenizer(backend, bos_id=default_bos if bos_id is None else bos_id,
                   eos_id=default_eos if eos_id is None else eos_id)


def _sentencepiece_file_tokenizer(path: str) -> tuple[tokenizers.Tokenizer, int | None, int | None]:
  """`(backend, bos_id, eos_id)` from a SentencePiece model file."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
  if model_type != "BPE":
    raise ValueError(f"{path}: SentencePiece model type {model_type} is not supported; only BPE (Llama-style) is")
  normalizer = proto.normalizer_spec
  if normalizer.name != "identity" or normalizer.remove_extra_whitespaces:
    raise ValueError(f"{path}: SentencePiece normalization {normalizer.name!r} (remove_extra_whitespaces="
                     f"{normalizer.remove_extra_whitespaces}) is not supported; only 'identity' without whitespace "
                     "removal (Llama's) is")
  pieces = [p.piece for p in proto.pieces]
  special = [p.piece for p in proto.pieces if p.type in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
  backend = sentencepiece_bpe(pieces, [p.score for p in proto.pieces], unk_id=proto.trainer_spec.unk_id,
                              special_tokens=special, add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix)
  spec = proto.trainer_spec
  return backend, (spec.bos_id if spec.bos_id >= 0 else None), (spec.eos_id if spec.eos_id >= 0 else None)


def _special_ids_from_configs(directory: str, backend: tokenizers.Tokenizer) -> tuple[int | None, int | None]:
  ids = {}
  tokenizer_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
  model_config = _read_json(os.path.join(directory, "config.json"))
  for name in ("bos", "eos"):
    token = tokenizer_config.get(f"{name}_token")
    if isinstance(token, dict):
      token = token.get("content")
    token_id = backend.token_to_id(token) if isinstance(token, str) else None
    if token_id is None and isinstance(model_config.get(f"{name}_token_id"), int):
      token_id = model_config[f"{name}_token_id"]
    ids[name] = token_id
  return ids["bos"], ids["eos"]


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)
