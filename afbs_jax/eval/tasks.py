"""Scoring the long-context tasks of `afbs_jax/data/tasks.py`: greedy answers, exact match, paired tests.

`score_samples(model, samples, tokenizer)` decodes every prompt greedily (at most `MAX_NEW_TOKENS` tokens)
and returns one bool per sample, so two methods scored on the same samples pair up sample by sample:
`mcnemar(correct_dense, correct_sparse)` is the exact McNemar test of their difference, and `accuracy`
the rate with its Wilson interval. A sample is correct when every one of its answers occurs, as whole
words, in the first line of the continuation, both sides normalised by `normalize` (NFKC, case-folded,
every character that is not a letter or a digit a space, whitespace collapsed, stripped). So " 4829371."
matches "4829371" and "DDKK, RRML and MIWQ" matches ("MIWQ", "DDKK", "RRML") in any order, while
"48293710" does not match "4829371"; later lines (where a model may go on listing other needles) never
count. This is RULER's all-answers string match, restricted to whole words and the first line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import statistics
from typing import Any
import unicodedata

import numpy as np

from afbs_jax.data.tasks import Sample
from afbs_jax.model import Llama, generate

MAX_NEW_TOKENS = 16
ALPHA = 0.05
# (prompts, max_new_tokens) -> new token ids per prompt, as `afbs_jax.model.generate` returns them.
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


def normalize(text: str) -> str:
  """NFKC, case-folded, non-alphanumerics as spaces, whitespace collapsed and stripped."""
  folded = unicodedata.normalize("NFKC", text).casefold()
  return " ".join("".join(char if char.isalnum() else " " for char in folded).split())


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
  """Every answer occurs as whole words in the prediction's first non-empty line (both normalised)."""
  lines = [line for line in prediction.splitlines() if normalize(line)]
  line = f" {normalize(lines[0])} " if lines else ""
  return bool(answers) and all(f" {normalize(answer)} " in line for answer in answers)


def score_predictions(samples: Sequence[Sample], predictions: Sequence[str]) -> np.ndarray:
  """bool [len(samples)]: `is_correct` of each prediction against its sample's answers."""
  if len(samples) != len(predictions):
    raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
  return np.array([is_correct(text, sample.answers) for sample, text in zip(samples, predictions)], bool)


def generate_predictions(model: Llama | GenerateFn, samples: Sequence[Sample], tokenizer, *, batch_size: int = 8,
                         max_new_tokens: int = MAX_NEW_TOKENS,
                         generate_options: Mapping[str, Any] | None = None) -> list[str]:
  """The greedy continuation of every sample's prompt, as text, up to its first EOS.

  Args:
    model: a `Llama` (its policy runs the prefill; greedy `generate`, stopping at EOS), or any `GenerateFn`.
      A newline does not stop it: a model may open its answer with one ("they are:\n DDKK, ..."), and
      `is_correct` reads the first non-empty line.
    samples: made for `tokenizer` (their `tokens` are fed as they are).
    tokenizer: decodes the continuations; its `eos_id` (if any) ends them.
    batch_size: prompts per call. Every call gets exactly `batch_size` prompts (a short batch is filled
      with copies of the longest sample, whose outputs are dropped), and a `Llama`'s batches are all
      right-padded to the longest sample's length (`generate`'s `pad_to`), so one compilation of
      `generate` serves every batch.
    max_new_tokens: tokens decoded per prompt.
    generate_options: more keywords for `generate` when `model` is a `Llama` (e.g. a decode policy).
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
  stop = _stop_tokens(tokenizer)
  prompts = [list(sample.tokens) for sample in samples]
  outputs: list[list[int]] = [[] for _ in prompts]
  anchor = max(range(len(prompts)), key=lambda row: len(prompts[row]), default=0)
  if isinstance(model, Llama):
    llama = model
    # Every batch padded to the longest prompt: one compilation of the prefill for all of them.
    options = {"pad_to": len(prompts[anchor]) if prompts else None, **(generate_options or {})}
    model = lambda prompts, new: generate(llama, prompts, new, stop_tokens=sorted(stop), **options)
  for rows in _batches([len(prompt) for prompt in prompts], batch_size):
    batch = [prompts[row] for row in rows] + [prompts[anchor]] * (batch_size - len(rows))
    for row, new in zip(rows, model(batch, max_new_tokens)):
      outputs[row] = list(new)
  return [tokenizer.decode(_until_stop(new, stop)) for new in outputs]


def score_samples(model: Llama | GenerateFn, samples: Sequence[Sample], tokenizer, *, batch_size: int = 8,
                  max_new_tokens: int = MAX_NEW_TOKENS,
                  generate_options: Mapping[str, Any] | None = None) -> np.ndarray:
  """bool [len(samples)]: whether greedy decoding answers each sample (see the module docstring); the
  arguments are `generate_predictions`'s."""
  predictions = generate_predictions(model, samples, tokenizer, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, generate_options=generate_options)
  return score_predictions(samples, predictions)


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
  """The tokens before the first stop token (`generate` keeps it, a `GenerateFn` may go on past it)."""
  ends = [position for position, token in enumerate(tokens) if token in stop]
  return tokens[:ends[0]] if ends else tokens


def _stop_tokens(tokenizer) -> set[int]:
  eos = getattr(tokenizer, "eos_id", None)
  return set() if eos is None else {int(eos)}


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  """Rows in order, at most batch_size per batch; a batch without a longest row keeps a slot for one."""
  longest = max(lengths, default=0)
  batches, begin = [], 0
  while begin < len(lengths):
    rows = list(range(begin, min(begin + batch_size, len(lengths))))
    if batch_size > 1 and len(rows) == batch_size and all(lengths[row] < longest for row in rows):
      rows = rows[:-1]
    batches.append(rows)
    begin += len(rows)
  return batches


@dataclasses.dataclass(frozen=True)
class Accuracy:
  """correct of total samples; low, high: the Wilson score interval at `confidence`."""

  correct: int
  total: int
  low: float
  high: float
  confidence: float = 0.95

  @property
  def value(self) -> float:
    return self.correct / self.total if self.total else float("nan")


def accuracy(correct: Sequence[bool] | np.ndarray, *, confidence: float = 0.95) -> Accuracy:
  """The share of correct samples with its Wilson score interval (sound at 0 % and 100 %)."""
  correct = np.asarray(correct, bool).reshape(-1)
  hits, total = int(correct.sum()), correct.size
  if not total:
    return Accuracy(0, 0, float("nan"), float("nan"), confidence)
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
  rate = hits / total
  center = (rate + z * z / (2 * total)) / (1 + z * z / total)
  half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / (1 + z * z / total)
  low = 0.0 if hits == 0 else max(0.0, center - half)  # exact at the ends, free of rounding
  high = 1.0 if hits == total else min(1.0, center + half)
  return Accuracy(hits, total, low, high, confidence)


@dataclasses.dataclass(frozen=True)
class PairedTest:
  """The exact McNemar test of methods a and b on the same samples.

  Attributes:
    total: samples.
    accuracy_a, accuracy_b: each method's share of correct samples.
    only_a: samples a answers and b does not; only_b: the reverse (the discordant pairs).
    p_value: two-sided, exact: 2 · P(X <= min(only_a, only_b)) for X ~ Binomial(only_a + only_b, 1/2),
      capped at 1 (1 when no pair is discordant).
    alpha: the level `significant` compares against.
  """

  total: int
  accuracy_a: float
  accuracy_b: float
  only_a: int
  only_b: int
  p_value: float
  alpha: float = ALPHA

  @property
  def significant(self) -> bool:
    return self.p_value < self.alpha

  @property
  def difference(self) -> float:
    """accuracy_b - accuracy_a."""
    return self.accuracy_b - self.accuracy_a


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray, *,
            alpha: float = ALPHA) -> PairedTest:
  """Exact McNemar test of two per-sample correctness vectors of the same samples (e.g. dense, sparse)."""
  a, b = (np.asarray(x, bool).reshape(-1) for x in (correct_a, correct_b))
  if a.shape != b.shape:
    raise ValueError(f"mcnemar: the two methods scored {a.size} and {b.size} samples; pair the same samples")
  if not 0 < alpha < 1:
    raise ValueError(f"mcnemar: alpha must lie in (0, 1); got {alpha}")
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  rate = lambda x: float(x.mean()) if x.size else float("nan")
  return PairedTest(a.size, rate(a), rate(b), only_a, only_b, binomial_two_sided(min(only_a, only_b),
                                                                                   only_a + only_b), alpha)


def binomial_two_sided(k: int, n: int) -> float:
  """min(1, 2 · P(X <= k)) for X ~ Binomial(n, 1/2) and k <= n / 2, in exact integer arithmetic."""
  if not 0 <= k <= n:
    raise ValueError(f"binomial_two_sided: need 0 <= k <= n; got k={k}, n={n}")
  k = min(k, n - k)
  return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
