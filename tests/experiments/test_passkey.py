"""experiments.passkey: trial construction, greedy decoding on a fake model, and the quick run's schema."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np

from afbs_jax.calibration import ByteTokenizer
from experiments import common, passkey

_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 20


def test_trials_hide_the_key_at_its_depth():
  tokenizer = ByteTokenizer()
  haystack = np.asarray(tokenizer.encode(_FILLER), np.int32)
  rows = passkey.make_trials(tokenizer, haystack, context=300, depths=passkey.DEPTHS, trials=2, seed=0)
  again = passkey.make_trials(tokenizer, haystack, context=300, depths=passkey.DEPTHS, trials=2, seed=0)
  assert [[t.key for t in row] for row in rows] == [[t.key for t in row] for row in again]
  for depth, row in zip(passkey.DEPTHS, rows):
    for trial in row:
      assert len(trial.key) == 5 and trial.key.isdigit() and trial.depth == depth
      assert trial.head.size + trial.tail.size == 300
      needle = passkey.NEEDLE.format(key=trial.key)
      assert tokenizer.decode(trial.tail).startswith(needle)
      filler = 300 - len(needle) - len(passkey.QUESTION) - 1  # The space before the key joins the question.
      assert trial.head.size == round(depth * filler)
      assert tokenizer.decode(trial.tail).endswith(passkey.QUESTION + " ")
      assert tokenizer.decode(trial.answer) == trial.key


class _NextByte:
  """A fake model whose greedy continuation of any prompt is last token + 1, + 2, ...; records input shapes."""

  def __init__(self):
    self.shapes = []

  def __call__(self, tokens):
    self.shapes.append(tokens.shape)
    return jnp.eye(256)[(jnp.asarray(tokens) + 1) % 256]


def test_greedy_decode_keeps_one_shape_and_pads_the_last_batch():
  tokenizer = ByteTokenizer()
  haystack = np.asarray(tokenizer.encode(_FILLER), np.int32)
  trials = passkey.make_trials(tokenizer, haystack, context=200, depths=(0.5,), trials=3, seed=1)[0]
  model = _NextByte()
  decoded = passkey.greedy_decode(model, trials, batch_size=2)
  assert decoded.shape == (3, 5)
  assert set(model.shapes) == {(2, 200)} and len(model.shapes) == 2 * 5
  last = trials[0].tail[-1]  # The prompt ends with the question's trailing space.
  np.testing.assert_array_equal(decoded, np.tile((last + 1 + np.arange(5)) % 256, (3, 1)))


def test_quick_run_writes_a_recall_table(tmp_path, work_dir):
  payload = passkey.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  written = json.loads((tmp_path / "passkey_quick.json").read_text())
  assert written["experiment"] == "passkey" and written["setting"]["name"] == "quick"
  assert (tmp_path / "passkey_quick.png").stat().st_size > 0
  assert passkey.discuss(payload) in (tmp_path / "passkey_quick.md").read_text()
  trials = passkey.TRIALS["quick"]
  assert written["methods"] == list(passkey.METHODS) and written["depths"] == list(passkey.DEPTHS)
  assert written["context"] == common.QUICK.context and written["answer_tokens"] == 5
  assert 0.0 <= written["target_sparsity"] < 1.0
  assert np.shape(written["keys"]) == (len(passkey.DEPTHS), trials)
  for name in passkey.METHODS:
    accuracy = written["accuracy"][name]
    assert len(accuracy) == len(passkey.DEPTHS) and all(0.0 <= value <= 1.0 for value in accuracy)
    assert written["mean_accuracy"][name] == np.mean(accuracy)
    assert np.shape(written["predictions"][name]) == (len(passkey.DEPTHS), trials)
    for keys, predictions, value in zip(written["keys"], written["predictions"][name], accuracy):
      assert value == np.mean([key == text for key, text in zip(keys, predictions)])
