"""experiments.passkey: trial construction, teacher-forced scoring against greedy decoding on fake models, and the
quick run's schema."""

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


class _Oracle:
  """A fake model whose argmax at every position is the next token of the input; records input shapes."""

  def __init__(self):
    self.shapes = []

  def __call__(self, tokens):
    self.shapes.append(tokens.shape)
    following = jnp.concatenate([jnp.asarray(tokens)[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    return jnp.eye(256)[following]


def _greedy(model, trial, steps):
  """Step-by-step greedy decoding of one trial (the definition teacher forcing must agree with)."""
  out = []
  for step in range(steps):
    tokens = np.concatenate([trial.head[step:], trial.tail, np.asarray(out, np.int32)])[None]
    out.append(int(np.argmax(np.asarray(model(tokens))[0, -1])))
  return np.asarray(out)


def test_teacher_forcing_keeps_one_shape_pads_the_last_batch_and_agrees_with_greedy():
  tokenizer = ByteTokenizer()
  haystack = np.asarray(tokenizer.encode(_FILLER), np.int32)
  trials = passkey.make_trials(tokenizer, haystack, context=200, depths=(0.5,), trials=3, seed=1)[0]
  oracle = _Oracle()
  decoded = passkey.teacher_forced_argmax(oracle, trials, batch_size=2)
  assert decoded.shape == (3, 5)
  assert set(oracle.shapes) == {(2, 200)} and len(oracle.shapes) == 2   # one forward per batch
  np.testing.assert_array_equal(decoded[:, :4], np.stack([trial.answer[:4] for trial in trials]))  # the next tokens

  # A model that reads the key back from the needle: greedy and teacher forcing both recall it; a model
  # that gets one middle digit wrong fails both, although teacher forcing still sees the true prefix.
  def reader(wrong_at=None):
    def model(tokens):
      tokens = np.asarray(tokens)
      logits = np.zeros(tokens.shape + (256,), np.float32)
      for row, sequence in enumerate(tokens):
        text = tokenizer.decode(sequence)
        key = text.split("pass key is ")[1][:5]
        done = len(text) - text.rindex(passkey.QUESTION + " ") - len(passkey.QUESTION) - 1
        for position in range(len(sequence) - 5, len(sequence)):
          digit = position - (len(sequence) - done - 1)
          if 0 <= digit < 5:
            guess = key[digit] if digit != wrong_at else str((int(key[digit]) + 1) % 10)
            logits[row, position, tokenizer.encode(guess)[0]] = 1.0
      return jnp.asarray(logits)
    return model

  for wrong_at, recalled in ((None, True), (2, False)):
    model = reader(wrong_at)
    forced = passkey.teacher_forced_argmax(model, trials, batch_size=2)
    for trial, row in zip(trials, forced):
      greedy = _greedy(model, trial, 5)
      assert np.array_equal(greedy, trial.answer) == recalled
      assert np.array_equal(row, trial.answer) == recalled


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
