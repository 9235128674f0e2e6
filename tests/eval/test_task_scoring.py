"""Tests for afbs_jax.eval.tasks: exact-match normalisation, scoring through fake and tiny models, batching
into one compiled shape, Wilson intervals and the exact McNemar test against known values."""

from __future__ import annotations

import numpy as np
import pytest

import configs
from afbs_jax.calibration import ByteTokenizer
from afbs_jax.data import tasks as data_tasks
from afbs_jax.eval import tasks
from afbs_jax.model import init_random

TOKENIZER = ByteTokenizer()


@pytest.mark.parametrize("prediction, answers, expected", [
    (" 4829371.", ("4829371",), True),
    ("4829371\nOne of the special magic numbers for x is: 1111111.", ("4829371",), True),
    ("48293710", ("4829371",), False),  # whole words only
    ("\n\n  Oslo, I think", ("oslo",), True),  # leading blank lines skipped, case folded
    (" 1111111.\n4829371", ("4829371",), False),  # only the first line counts
    (" DDKK, rrml and MIWQ.", ("MIWQ", "DDKK", "RRML"), True),  # any order
    (" DDKK and MIWQ", ("MIWQ", "DDKK", "RRML"), False),  # every answer required
    (" ｆｉｇ!", ("fig",), True),  # NFKC
    ("", ("fig",), False),
    ("fig", (), False),
])
def test_exact_match(prediction, answers, expected):
  assert tasks.is_correct(prediction, answers) is expected


def test_normalize():
  assert tasks.normalize("  The top-3 words: Ünited,\tSTATES!  ") == "the top 3 words ünited states"


@pytest.fixture(scope="module")
def samples() -> list[data_tasks.Sample]:
  return (data_tasks.make_samples("niah_multikey", 1024, 4, 0, TOKENIZER)
          + data_tasks.make_samples("variable_tracking", 1024, 3, 0, TOKENIZER))


class FakeGenerate:
  """Answers every prompt it knows, correctly or wrongly, and records each batch it is given."""

  def __init__(self, samples, *, right: bool):
    self.replies = {s.tokens: (" " + ", ".join(s.answers) if right else " 0") + "\nmore" for s in samples}
    self.batches: list[list[int]] = []

  def __call__(self, prompts, max_new_tokens):
    self.batches.append([len(prompt) for prompt in prompts])
    return [TOKENIZER.encode(self.replies[tuple(prompt)])[:max_new_tokens] for prompt in prompts]


def test_scoring_a_fake_model(samples):
  right = FakeGenerate(samples, right=True)
  correct = tasks.score_samples(right, samples, TOKENIZER, batch_size=3, max_new_tokens=64)
  assert correct.dtype == bool and correct.tolist() == [True] * len(samples)
  longest = max(sample.num_tokens for sample in samples)
  assert all(len(batch) == 3 and max(batch) == longest for batch in right.batches)  # one compiled shape
  assert tasks.score_samples(FakeGenerate(samples, right=False), samples, TOKENIZER).tolist() == [False] * 7
  # Truncation is the model's: 16 bytes cut the three variable names short.
  cut = tasks.score_samples(FakeGenerate(samples, right=True), samples, TOKENIZER, max_new_tokens=16)
  assert cut.tolist() == [True] * 4 + [False] * 3


def test_predictions_end_at_eos_and_pair_with_samples(samples):
  predictions = tasks.generate_predictions(FakeGenerate(samples, right=True), samples, TOKENIZER, max_new_tokens=64)
  assert predictions[0] == " " + samples[0].answers[0] + "\nmore"  # a newline does not stop; is_correct cuts
  assert tasks.score_predictions(samples, predictions).all()
  with pytest.raises(ValueError, match="7 samples but 6 predictions"):
    tasks.score_predictions(samples, predictions[:-1])

  class WithEos(ByteTokenizer):
    eos_id = ord("m")

  assert tasks.generate_predictions(FakeGenerate(samples, right=True), samples[:1], WithEos(),
                                    max_new_tokens=64) == [" " + samples[0].answers[0] + "\n"]


def test_scoring_the_tiny_model():
  """The real generate path: ragged byte prompts in batches filled up to one shape, text and a bool per sample."""
  model = init_random(configs.get_config("tiny").model, seed=0)
  prompts = ["The pass key is 42. The pass key is", "Hello", "Oslo is a city. Oslo is", "x"]
  samples = [data_tasks.Sample("niah_single", index, text, tuple(TOKENIZER.encode(text)), ("42",))
             for index, text in enumerate(prompts)]
  calls = []
  real_generate = tasks.generate
  def recording_generate(model, prompts, new, **options):
    calls.append((len(prompts), options["pad_to"]))
    return real_generate(model, prompts, new, **options)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tasks, "generate", recording_generate)
    predictions = tasks.generate_predictions(model, samples, TOKENIZER, batch_size=3, max_new_tokens=4)
  assert all(isinstance(text, str) and len(text) <= 4 for text in predictions)
  assert tasks.score_predictions(samples, predictions).shape == (4,)
  # Both batches have one shape: 3 prompts padded to the longest sample (one compilation).
  assert calls == [(3, len(samples[0].tokens))] * 2


def test_accuracy_wilson_interval():
  summary = tasks.accuracy([True, True, False, True])
  assert (summary.correct, summary.total, summary.value) == (3, 4, 0.75)
  assert summary.low == pytest.approx(0.300642, abs=1e-6) and summary.high == pytest.approx(0.954413, abs=1e-6)
  assert (tasks.accuracy([False] * 10).low, tasks.accuracy([True] * 10).high) == (0.0, 1.0)


@pytest.mark.parametrize("only_a, only_b, p_value", [
    (1, 9, 0.021484375),  # 2 · (1 + 10) / 2^10
    (0, 6, 0.03125),  # 2 / 2^6
    (0, 5, 0.0625),
    (5, 5, 1.0),
    (0, 0, 1.0),
])
def test_mcnemar_known_values(only_a, only_b, p_value):
  both, neither = 7, 3
  a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
  b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
  result = tasks.mcnemar(a, b)
  assert (result.only_a, result.only_b, result.total) == (only_a, only_b, len(a))
  assert result.p_value == pytest.approx(p_value, rel=1e-12)
  assert result.significant is (p_value < 0.05)
  assert result.difference == pytest.approx((only_b - only_a) / len(a))


def test_exact_binomial_matches_scipy():
  stats = pytest.importorskip("scipy.stats")
  for n in (1, 2, 7, 30, 200):
    for k in range(0, n // 2 + 1, max(1, n // 10)):
      assert tasks.binomial_two_sided(k, n) == pytest.approx(stats.binomtest(k, n, 0.5).pvalue, rel=1e-9)


def test_mcnemar_rejects_unpaired_vectors():
  with pytest.raises(ValueError, match="pair the same samples"):
    tasks.mcnemar([True, False], [True])
  with pytest.raises(ValueError, match="alpha"):
    tasks.mcnemar([True], [True], alpha=1.5)
