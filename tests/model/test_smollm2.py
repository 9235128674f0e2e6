"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loading of the same file.

Run as a script (`python -m tests.model.test_smollm2`) to print the numbers the tolerances below
were set from: logits difference, tokenizer agreement, and perplexity on a slice of the bundled
State of the Union test split (ours, transformers', and ours with llama.cpp's Q/K row order left
in place, which shows what the band rules out).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest

from afbs_jax.data import load_corpus
from afbs_jax.eval.perplexity import corpus_token_ids, perplexity
from afbs_jax.model import gguf_loader
from afbs_jax.model.gguf_loader import default_gguf_path, load_gguf, read_gguf
from tests.model.conftest import hf_logits

SHORT_TEXT = "The State of the Union is strong. Today we gather to reflect on the year past and the work ahead."
SENTENCES = [
    SHORT_TEXT,
    "In 1913, 42 senators voted; 3.14159 is pi, and 1,000,000 is a million.",
    "<|im_start|>user\nWhat's the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "  Leading spaces,\ttabs\tand\n\nblank lines   ",
    "Ünïcödé: naïve café, 東京, emoji 🙂, and — dashes.",
]
PPL_CONTEXT = 1024
PPL_STRIDE = 512
PPL_CHARS = 8000  # Comfortably more than PPL_CONTEXT tokens of SOTU prose (~4.5 characters a token).

# Logits are f32 on both sides; they differ only by summation order over 30 layers (dot products,
# softmax, RMSNorm). Measured max |diff| 1.7e-4 on logits of magnitude ~30 (2 CPU cores, jax 0.10.2,
# torch 2.13): a 10x margin.
LOGITS_ATOL = 2e-3
# Dense perplexity of the first PPL_CONTEXT tokens of the SOTU test split (1913 prose) at context 1024,
# one window: measured 33.37 here, and 33.37 with transformers on the same tokens (relative difference
# 1.6e-7). The +-6% band leaves room for other BLAS/XLA builds and accelerators' matmul precision while
# ruling out real faults: keeping llama.cpp's Q/K row order gives 281.5, and a broken tokenizer or
# weight map far more.
PPL_BAND = (31.5, 35.5)
PPL_MATCH_RTOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _parse_the_gguf_once():
  """One parse of the file for every loader in this module.

  Ours (the config test and the model) and transformers (its config, tokenizer and weights, each a fresh
  `gguf.GGUFReader`) read the same file through gguf-py, five parses of the 49K-entry vocabulary and merges
  at ~5 s of CPU each, and transformers rebuilds gguf-py's tensor-name map for each of its ~400 tensors.
  A shared reader (read-only memory map: no loader can change what another reads) and one name map per
  architecture leave both loaders' own code paths as they are, so the comparison stays between two
  independent loaders of one file, at less than half the module's CPU time (measured 56 -> 25 s).
  """
  import gguf  # pylint: disable=g-import-not-at-top

  parse = gguf.GGUFReader
  readers = {}

  def shared_reader(path, mode="r"):
    key = (os.path.realpath(os.fspath(path)), mode)
    if key not in readers:
      readers[key] = parse(path, mode)
    return readers[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(gguf, "GGUFReader", shared_reader)
    patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    yield


@pytest.fixture(scope="module")
def smollm2():
  return load_gguf(param_dtype="float32")


@pytest.fixture(scope="module")
def hf_smollm2():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  return load_hf_smollm2()


def load_hf_smollm2():
  """transformers' own loading of the same GGUF file: (model, tokenizer)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  path = default_gguf_path()
  directory, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def sotu_slice(tokenizer) -> np.ndarray:
  """The first PPL_CONTEXT token ids of the bundled SOTU test split, int32 [PPL_CONTEXT]."""
  ids = corpus_token_ids(tokenizer, load_corpus("sotu").test[:PPL_CHARS])
  assert len(ids) >= PPL_CONTEXT
  return ids[:PPL_CONTEXT]


def single_window_perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
  """exp(mean NLL) of ids[1:] under logits [1, seq, vocab] of one forward pass over ids."""
  logits = logits[0, :-1].astype(np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return math.exp(float(np.mean(log_z - logits[np.arange(len(ids) - 1), ids[1:]])))


def test_config_comes_from_the_gguf_metadata():
  config, tensors, tokenizer = read_gguf(default_gguf_path())
  assert (config.num_layers, config.num_heads, config.num_kv_heads, config.hidden_size,
          config.intermediate_size) == (30, 9, 3, 576, 1536)
  assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (1e5, 1e-5, 8192)
  assert (config.vocab_size, tokenizer.vocab_size, config.tie_word_embeddings) == (49152, 49152, True)
  assert "lm_head.weight" not in tensors
  assert {tensors.gguf_type(n) for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                        "model.norm.weight")} == {"Q8_0", "Q4_1", "F32"}
  assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


@pytest.mark.slow
def test_tokenizer_matches_transformers(smollm2, hf_smollm2):
  _, tokenizer = smollm2
  _, hf_tokenizer = hf_smollm2
  for text in SENTENCES:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_logits_match_transformers(smollm2, hf_smollm2):
  model, tokenizer = smollm2
  tokens = np.asarray([tokenizer.encode(SHORT_TEXT)], dtype=np.int32)
  ours, reference = np.asarray(model(tokens)), hf_logits(hf_smollm2[0], tokens)
  np.testing.assert_allclose(ours, reference, atol=LOGITS_ATOL, rtol=0)
  np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_dense_perplexity_on_a_sotu_slice(smollm2, hf_smollm2):
  model, tokenizer = smollm2
  ids = sotu_slice(tokenizer)
  ppl = perplexity(model, ids, PPL_CONTEXT, PPL_STRIDE, batch_size=1, progress=False)
  assert PPL_BAND[0] < ppl < PPL_BAND[1]
  reference = single_window_perplexity(hf_logits(hf_smollm2[0], ids[None]), ids)
  assert ppl == pytest.approx(reference, rel=PPL_MATCH_RTOL)


def _measure() -> None:
  """Prints the numbers behind the tolerances above."""
  import platform  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  model, tokenizer = load_gguf(param_dtype="float32")
  hf_model, hf_tokenizer = load_hf_smollm2()
  agree = [tokenizer.encode(t) == hf_tokenizer.encode(t, add_special_tokens=False) for t in SENTENCES]
  tokens = np.asarray([tokenizer.encode(SHORT_TEXT)], dtype=np.int32)
  ours, reference = np.asarray(model(tokens)), hf_logits(hf_model, tokens)
  ids = sotu_slice(tokenizer)
  ppl = perplexity(model, ids, PPL_CONTEXT, PPL_STRIDE, batch_size=1, progress=False)
  hf_ppl = single_window_perplexity(hf_logits(hf_model, ids[None]), ids)
  keep_rows = gguf_loader.unpermute_rotary_rows
  gguf_loader.unpermute_rotary_rows = lambda weight, num_heads: weight
  try:
    unfixed_ppl = perplexity(load_gguf(param_dtype="float32")[0], ids, PPL_CONTEXT, PPL_STRIDE, batch_size=1,
                             progress=False)
  finally:
    gguf_loader.unpermute_rotary_rows = keep_rows
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
  print(f"tokenizer agrees with transformers on {sum(agree)}/{len(agree)} sentences")
  argmax_agreement = (ours.argmax(-1) == reference.argmax(-1)).mean()
  print(f"logits ({tokens.shape[1]} tokens): max |ours - transformers| = {np.abs(ours - reference).max():.3g}, "
        f"max |logit| = {np.abs(reference).max():.3g}, argmax agreement = {argmax_agreement}")
  print(f"perplexity, SOTU test[:{len(ids)} tokens], context {PPL_CONTEXT}: ours {ppl:.4f}, transformers {hf_ppl:.4f} "
        f"(rel diff {abs(ppl - hf_ppl) / hf_ppl:.2e}); Q/K rows left in llama.cpp order: {unfixed_ppl:.2f}")


if __name__ == "__main__":
  _measure()
