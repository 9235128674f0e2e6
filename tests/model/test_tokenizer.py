"""Tests for the tokenizers: byte-level BPE from GGUF metadata, SentencePiece BPE, HF directories."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece
import tokenizers
from tokenizers import pre_tokenizers

from afbs_jax.model.tokenizer import Tokenizer, load_hf_tokenizer, tokenizer_from_gguf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGED = ["he", "Ġt", "Ġthe", "ll", "llo", "12"]
MERGES = ["h e", "Ġ t", "Ġt he", "l l", "ll o", "1 2"]
TOKENS = SPECIALS + ALPHABET + MERGED
ID = {token: index for index, token in enumerate(TOKENS)}


def byte_level_metadata(pre: str = "gpt2") -> dict:
  """GGUF `tokenizer.*` metadata of a tiny byte-level BPE vocabulary."""
  return {
      "tokenizer.ggml.model": "gpt2",
      "tokenizer.ggml.pre": pre,
      "tokenizer.ggml.tokens": TOKENS,
      "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)),
      "tokenizer.ggml.merges": MERGES,
      "tokenizer.ggml.bos_token_id": 1,
      "tokenizer.ggml.eos_token_id": 2,
  }


@pytest.mark.parametrize("text, expected", [
    ("hello the", ["he", "llo", "Ġthe"]),
    ("<|im_start|>hello<|im_end|>", ["<|im_start|>", "he", "llo", "<|im_end|>"]),
    ("the\n", ["t", "he", "Ċ"]),
])
def test_byte_level_bpe_from_gguf_metadata_encodes_with_merges_and_whole_specials(text, expected):
  tokenizer = tokenizer_from_gguf(byte_level_metadata())
  ids = tokenizer.encode(text)
  assert ids == [ID[t] for t in expected]
  assert tokenizer.decode(ids) == text


def test_byte_level_tokenizer_reports_vocab_and_special_ids_and_adds_no_bos():
  tokenizer = tokenizer_from_gguf(byte_level_metadata())
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (len(TOKENS), 1, 2)
  assert tokenizer.encode("") == []


@pytest.mark.parametrize("pre, expected", [("gpt2", ["12"]), ("smollm", ["1", "2"])])
def test_pre_tokenizer_follows_gguf_pre_type(pre, expected):
  # SmolLM's vocabulary was learned on single digits, so its pre-type splits digits before BPE.
  assert tokenizer_from_gguf(byte_level_metadata(pre)).encode("12") == [ID[t] for t in expected]


def test_unknown_pre_type_warns_and_splits_like_gpt2():
  with pytest.warns(UserWarning, match="Unknown byte-level pre-tokenizer 'mystery'"):
    tokenizer = tokenizer_from_gguf(byte_level_metadata("mystery"))
  assert tokenizer.encode("12") == [ID["12"]]


@pytest.mark.parametrize("metadata, message", [
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "tokenizer.ggml.model='bert'"),
    ({"tokenizer.ggml.model": "gpt2"}, "no tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "needs tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "needs tokenizer.ggml.scores"),
])
def test_bad_gguf_tokenizer_metadata_raises(metadata, message):
  with pytest.raises(ValueError, match=message):
    tokenizer_from_gguf(metadata)


def test_encode_rejects_non_text():
  with pytest.raises(ValueError, match="text must be a str"):
    tokenizer_from_gguf(byte_level_metadata()).encode([1, 2])


# ------------------------------------------------------------------------------------------------
# SentencePiece BPE (Llama-2 style), checked against sentencepiece itself.
# ------------------------------------------------------------------------------------------------

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A state of the union address is given every year.",
    "Numbers like 1234 and 56 appear, as do émigrés and naïve cafés.",
    "Hello hello world, the world says hello.",
] * 20
SPM_SAMPLES = ["The quick dog says hello.", "  two  spaces", "ünïcödé ✓ 42", "Hello\nworld", "zebra quokka"]


@pytest.fixture(scope="module")
def spm_model() -> bytes:
  """A tiny Llama-style SentencePiece model: BPE, byte fallback, identity normalisation."""
  buffer = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SPM_CORPUS), model_writer=buffer, vocab_size=400, model_type="bpe", byte_fallback=True,
      character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
  return buffer.getvalue()


def _spm_gguf_metadata(model: bytes) -> dict:
  """What llama.cpp's converter writes for a SentencePiece vocabulary."""
  processor = sentencepiece.SentencePieceProcessor(model_proto=model)
  size = processor.get_piece_size()
  types = [3 if processor.is_control(i) else 2 if processor.is_unknown(i) else 6 if processor.is_byte(i) else 1
           for i in range(size)]
  return {
      "tokenizer.ggml.model": "llama",
      "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(size)],
      "tokenizer.ggml.scores": [processor.get_score(i) for i in range(size)],
      "tokenizer.ggml.token_type": types,
      "tokenizer.ggml.unknown_token_id": processor.unk_id(),
      "tokenizer.ggml.bos_token_id": processor.bos_id(),
      "tokenizer.ggml.eos_token_id": processor.eos_id(),
  }


@pytest.mark.parametrize("source", ["tokenizer.model", "gguf"])
def test_sentencepiece_bpe_matches_sentencepiece(spm_model, tmp_path, source):
  if source == "gguf":
    tokenizer = tokenizer_from_gguf(_spm_gguf_metadata(spm_model))
  else:
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    tokenizer = load_hf_tokenizer(tmp_path)
  reference = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 400)
  for text in SPM_SAMPLES:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text), text
    assert tokenizer.decode(ids) == text


def test_non_bpe_sentencepiece_model_is_rejected(tmp_path):
  buffer = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(SPM_CORPUS), model_writer=buffer, vocab_size=50,
                                           model_type="unigram", minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="model type UNIGRAM is not supported"):
    load_hf_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories.
# ------------------------------------------------------------------------------------------------


def test_hf_directory_with_tokenizer_json_reads_special_ids_from_configs(tmp_path):
  tokenizer_from_gguf(byte_level_metadata()).backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<|im_start|>"}}))
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
  tokenizer = load_hf_tokenizer(tmp_path)
  assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 0)
  assert tokenizer.encode("hello the") == [ID["he"], ID["llo"], ID["Ġthe"]]


def test_hf_directory_without_tokenizer_gives_none(tmp_path):
  assert load_hf_tokenizer(tmp_path) is None


def test_missing_hf_directory_raises(tmp_path):
  with pytest.raises(ValueError, match="directory must be an existing directory"):
    load_hf_tokenizer(tmp_path / "absent")


def test_tokenizer_rejects_a_non_tokenizers_backend():
  with pytest.raises(ValueError, match="backend must be a tokenizers.Tokenizer"):
    Tokenizer("not a tokenizer")
  assert isinstance(tokenizer_from_gguf(byte_level_metadata()).backend, tokenizers.Tokenizer)
