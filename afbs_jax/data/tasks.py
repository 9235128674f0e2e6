"""Long-context tasks with short exact answers, generated offline from the bundled corpora.

`make_samples(task, length_tokens, num_samples, seed, tokenizer)` returns prompts of `length_tokens`
tokens of `tokenizer` (at most that many, at least 1 % fewer), each ending in an answer prefix so that a
base model's greedy continuation of at most 16 tokens is the answer. Four tasks follow RULER (Hsieh et al.,
2024): `niah_single` (one "special magic number" for a key hidden in prose), `niah_multikey` (the same
among `NIAH_DISTRACTORS` needles of other keys; one is asked), `variable_tracking` (two chains
"VAR A = 12345.", "VAR B = VAR A.", ... scattered through prose; every name bound to one value is asked)
and `common_words` (a word list in which `COMMON_WORDS` words recur far more often than the rest; they are
asked). The fifth, `story_retrieval`, plants `STORY_FACTS` facts "<name>'s <thing> is <value>." in the
prose, among them one that shares the asked fact's thing and one that shares its name, and asks one.

Prose is the held-out (test) split of a bundled corpus, so no text the tuner calibrated on returns, joined
into one paragraph; needles go in at the sentence end nearest their depth. The asked needle's depth is
`DEPTHS[index % len(DEPTHS)]` of the prose (both NIAH tasks and story retrieval), so every depth gets the
same share of samples; other needles sit at random depths. Each sample draws from its own generator, seeded
by (seed, task, length, index): sample i is the same whatever `num_samples`, and every method scored on
one seed sees the same prompts. A `Sample` carries the prompt's text and token ids; scoring (greedy
answers, exact match, paired tests) is `afbs_jax/eval/tasks.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
import itertools
import re
from typing import Any
import zlib

import numpy as np

from afbs_jax.data.corpora import load_corpus

TASKS = ("niah_single", "niah_multikey", "variable_tracking", "common_words", "story_retrieval")
LENGTHS = (1024, 2048, 4096, 8192)
NUM_SAMPLES = 100
# A prompt has between (1 - LENGTH_TOLERANCE) * length_tokens and length_tokens tokens.
LENGTH_TOLERANCE = 0.01
DEPTHS = tuple((slot + 0.5) / 10 for slot in range(10))
NIAH_DISTRACTORS = 3
NIAH_DIGITS = 7
# Two chains of three names each: the asked answer (three 4-letter names) stays within 16 tokens.
VT_CHAINS, VT_CHAIN_LENGTH, VT_NAME_LETTERS, VT_DIGITS = 2, 3, 4, 5
# The common words each appear max(COMMON_MIN, round(COMMON_SHARE * entries)) times, every other word at
# most UNCOMMON_FREQ times, so the top COMMON_WORDS are unambiguous at every length.
COMMON_WORDS, COMMON_SHARE, COMMON_MIN, UNCOMMON_FREQ = 3, 0.05, 5, 2
STORY_FACTS = 5
# A draw whose prompt length cannot land in the window (a word too many tokens long at the edge) is
# redrawn; each draw is a few tokenizer calls.
_DRAWS = 32
_FIT_STEPS = 12
_PROBE_UNITS = 64

NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kavya",
         "Luca", "Mina", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor",
         "Wendy", "Yusuf", "Zara")
ATTRIBUTES = {
    "favourite colour": ("amber", "crimson", "teal", "violet", "olive", "scarlet", "ivory", "indigo", "maroon"),
    "favourite fruit": ("mango", "apricot", "cherry", "lime", "plum", "papaya", "fig", "melon", "guava"),
    "home town": ("Lisbon", "Oslo", "Nairobi", "Lima", "Kyoto", "Dublin", "Quebec", "Tbilisi", "Hanoi"),
    "favourite instrument": ("cello", "banjo", "harp", "flute", "oboe", "trumpet", "ukulele", "violin", "tuba"),
    "favourite sport": ("rugby", "tennis", "chess", "hockey", "cricket", "fencing", "rowing", "golf", "karate"),
}

_NIAH_PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the numbers afterwards.")
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? The special "
                  "magic number for {key} mentioned in the provided text is")
_VT_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text."
_VT_QUESTION = ("Question: Find all variables that are assigned the value {value} in the text above. Answer: "
                "According to the chain(s) of variable assignment in the text above, {count} variables are "
                "assigned the value {value}, they are:")
_CWE_PREAMBLE = ("Below is a list of words. In these words, some appear more often than others. Memorize the "
                 "ones that appear most often.")
_CWE_QUESTION = ("Question: What are the {count} most common words in the above list? Answer: The top {count} "
                 "words that appear most often in the list are:")
_STORY_PREAMBLE = ("The following text mentions a few facts about some people. Read it carefully; I will ask "
                   "you about one of them afterwards.")
_STORY_QUESTION = "Question: What is {name}'s {thing}? Answer: {name}'s {thing} is"


@dataclasses.dataclass(frozen=True)
class Sample:
  """One prompt and what a correct continuation must contain.

  Attributes:
    task: one of TASKS.
    index: the sample's index in its (task, length, seed) set.
    prompt: the prompt text; `tokens` is its encoding (no BOS).
    tokens: the prompt's token ids under the tokenizer it was made for.
    answers: every string a correct answer contains (one for all tasks but variable_tracking and
      common_words).
    metadata: length_tokens (the target), depth (the asked needle's start as a fraction of the prose's
      words, or None), requested_depth, answer_offset (the asked needle's character offset in the prompt,
      or None), answer_tokens (tokens of " " + ", ".join(answers)), corpus, seed, units (prose words or
      list entries).
  """

  task: str
  index: int
  prompt: str = dataclasses.field(repr=False)
  tokens: tuple[int, ...] = dataclasses.field(repr=False)
  answers: tuple[str, ...]
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class _Source:
  """A corpus split as words: the prose, which words end a sentence, and a vocabulary for keys and lists."""

  words: tuple[str, ...]
  sentence_ends: np.ndarray  # bool [num_words]
  vocabulary: tuple[str, ...]  # sorted distinct all-lowercase alphabetic words of 4 to 10 letters


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A drawn sample before its length is fitted.

  body(units) -> (context text, [(character offset, depth in the prose's words)] per needle).
  """

  preamble: str
  question: str
  answers: tuple[str, ...]
  body: Callable[[int], tuple[str, list[tuple[int, float]]]]
  asked: int | None  # which needle holds the answer
  requested_depth: float | None


def make_samples(task: str, length_tokens: int, num_samples: int, seed: int, tokenizer: Any, *,
                 corpus: str = "sotu", split: str = "test") -> list[Sample]:
  """`num_samples` prompts of `task`, each `length_tokens` tokens long (within LENGTH_TOLERANCE, never more).

  Args:
    task: one of TASKS.
    length_tokens: the prompt length in tokens of `tokenizer`; leave room for the answer in the model's
      context (SmolLM2's 8192 holds a prompt of 8192 - 16 tokens and 16 new ones).
    num_samples: >= 1.
    seed: >= 0; with task, length and index it fixes every sample.
    tokenizer: has `.encode(text) -> list[int]` (a `Tokenizer`, or `ByteTokenizer` for the tiny model).
    corpus, split: the prose: a `load_corpus` name and one of its splits.

  Raises:
    ValueError: an unknown task, bad numbers, or a length too short for the task's fixed text.
  """
  if task not in TASKS:
    raise ValueError(f"make_samples: task={task!r} is not one of {', '.join(TASKS)}")
  for name, value in (("length_tokens", length_tokens), ("num_samples", num_samples)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"make_samples: {name} must be an integer >= 1; got {value!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"make_samples: seed must be an integer >= 0; got {seed!r}")
  source = _source(corpus, split)
  return [_sample(task, int(length_tokens), index, int(seed), tokenizer, source, corpus)
          for index in range(int(num_samples))]


def _sample(task: str, length: int, index: int, seed: int, tokenizer: Any, source: _Source, corpus: str) -> Sample:
  rng = np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])
  depth = DEPTHS[index % len(DEPTHS)]
  for _ in range(_DRAWS):
    spec = _BUILDERS[task](rng, source, depth)
    fitted = _fit(tokenizer, spec, length)
    if fitted is not None:
      break
  else:
    raise RuntimeError(f"{task} at {length} tokens: no prompt length within {LENGTH_TOLERANCE:.0%} after "
                       f"{_DRAWS} draws (sample {index}, seed {seed})")
  units, prompt, tokens, places = fitted
  offset, depth = (None, None) if spec.asked is None else places[spec.asked]
  metadata = {
      "length_tokens": length, "requested_depth": spec.requested_depth, "answer_offset": offset, "depth": depth,
      "answer_tokens": len(tokenizer.encode(" " + ", ".join(spec.answers))), "corpus": corpus, "seed": seed,
      "units": units}
  return Sample(task, index, prompt, tuple(int(t) for t in tokens), spec.answers, metadata)


def _assemble(spec: _Spec, units: int) -> tuple[str, list[tuple[int, float]]]:
  body, places = spec.body(units)
  shift = len(spec.preamble) + 1
  return f"{spec.preamble}\n{body}\n{spec.question}", [(offset + shift, depth) for offset, depth in places]


def _fit(tokenizer: Any, spec: _Spec, target: int) -> tuple[int, str, list[int], list[tuple[int, float]]] | None:
  """(units, prompt, tokens, needle places) with target * (1 - LENGTH_TOLERANCE) <= tokens <= target, or None.

  Searches the number of units (prose words, list entries): each step moves by the distance to the window's
  middle over the mean tokens per unit so far; None when a step returns to a count already tried (a unit of
  several tokens straddles the window) or the steps run out, and the caller redraws.
  """
  low = target - max(0, int(LENGTH_TOLERANCE * target))
  aim = (low + target) / 2
  counts: dict[int, int] = {}

  def measure(units: int) -> tuple[str, list[int], list[tuple[int, float]]]:
    prompt, places = _assemble(spec, units)
    tokens = tokenizer.encode(prompt)
    counts[units] = len(tokens)
    return prompt, tokens, places

  fixed = len(measure(0)[1])
  if fixed > low:
    raise ValueError(f"a {target}-token prompt cannot hold the task's {fixed} tokens of instructions, needles "
                     "and question with any text around them; use a longer length")
  units = _PROBE_UNITS
  for _ in range(_FIT_STEPS):
    prompt, tokens, places = measure(units)
    if low <= len(tokens) <= target:
      return units, prompt, tokens, places
    per_unit = max((len(tokens) - fixed) / units, 1e-3)
    step = round((aim - len(tokens)) / per_unit) or (1 if len(tokens) < low else -1)
    units = max(1, units + step)
    if units in counts:
      return None
  return None


# ------------------------------------------------------------------------------------------------
# The corpus as words.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _source(corpus: str, split: str) -> _Source:
  text = getattr(load_corpus(corpus), split)
  words = tuple(text.split())
  ends = np.array([re.search(r"[.!?][\"')\]]*$", word) is not None for word in words], bool)
  # Lowercase in the text: no proper names, which a list or a key would make ambiguous.
  vocabulary = tuple(sorted({word for word in (w.strip(".,;:!?\"'()[]") for w in words)
                             if word.isalpha() and word.isascii() and word.islower() and 4 <= len(word) <= 10}))
  return _Source(words, ends, vocabulary)


def _haystack(source: _Source, start: int, needles: list[tuple[float, str]],
              units: int) -> tuple[str, list[tuple[int, float]]]:
  """`units` prose words from `start` (wrapping around), each needle at the sentence end nearest its depth.

  Returns the text (words and needles joined by single spaces) and, per needle, its character offset and
  the fraction of the prose's words before it.
  """
  index = (start + np.arange(units)) % len(source.words)
  bounds = np.unique(np.concatenate([[0], np.flatnonzero(source.sentence_ends[index]) + 1, [units]]))
  positions = [int(bounds[np.argmin(np.abs(bounds - depth * units))]) for depth, _ in needles]
  pieces: list[str] = []
  slots: list[int] = [0] * len(needles)
  order = sorted(range(len(needles)), key=lambda n: (positions[n], n))  # ties keep the given order
  cursor = 0
  for n in order:
    pieces.extend(source.words[i] for i in index[cursor:positions[n]])
    cursor = positions[n]
    slots[n] = len(pieces)
    pieces.append(needles[n][1])
  pieces.extend(source.words[i] for i in index[cursor:])
  starts = [0, *itertools.accumulate(len(piece) + 1 for piece in pieces)]
  return " ".join(pieces), [(starts[slot], position / max(units, 1)) for slot, position in zip(slots, positions)]


def _prose(rng: np.random.Generator, source: _Source, needles: list[tuple[float, str]]):
  return functools.partial(_haystack, source, int(rng.integers(len(source.words))), needles)


# ------------------------------------------------------------------------------------------------
# The tasks: (rng, source, depth of the asked needle) -> _Spec.
# ------------------------------------------------------------------------------------------------


def _keys(rng: np.random.Generator, source: _Source, count: int) -> list[str]:
  """`count` distinct keys "word-word" from the corpus's vocabulary."""
  keys: list[str] = []
  while len(keys) < count:
    key = "-".join(source.vocabulary[i] for i in rng.choice(len(source.vocabulary), 2, replace=False))
    keys += [key] if key not in keys else []
  return keys


def _numbers(rng: np.random.Generator, digits: int, count: int) -> list[str]:
  values = rng.choice(9 * 10**(digits - 1), count, replace=False) + 10**(digits - 1)
  return [str(value) for value in values]


def _niah(rng: np.random.Generator, source: _Source, depth: float, *, distractors: int) -> _Spec:
  keys = _keys(rng, source, 1 + distractors)
  values = _numbers(rng, NIAH_DIGITS, 1 + distractors)
  depths = [depth, *rng.uniform(0.0, 1.0, distractors)]
  needles = [(d, _NIAH_NEEDLE.format(key=key, value=value)) for d, key, value in zip(depths, keys, values)]
  return _Spec(_NIAH_PREAMBLE, _NIAH_QUESTION.format(key=keys[0]), (values[0],), _prose(rng, source, needles),
               asked=0, requested_depth=depth)


def _variable_tracking(rng: np.random.Generator, source: _Source, depth: float) -> _Spec:
  del depth  # Chains are scattered at random depths; the answer is the whole chain, not one place.
  names: list[str] = []
  while len(names) < VT_CHAINS * VT_CHAIN_LENGTH:
    name = "".join(chr(ord("A") + letter) for letter in rng.integers(26, size=VT_NAME_LETTERS))
    names += [name] if name not in names and name != "VAR" else []
  values = _numbers(rng, VT_DIGITS, VT_CHAINS)
  needles = []
  for chain, value in enumerate(values):
    bound = names[chain * VT_CHAIN_LENGTH:(chain + 1) * VT_CHAIN_LENGTH]
    statements = [f"VAR {bound[0]} = {value}."] + [f"VAR {name} = VAR {prior}." for prior, name in
                                                    zip(bound, bound[1:])]
    needles += list(zip(np.sort(rng.uniform(0.0, 1.0, len(statements))), statements))
  question = _VT_QUESTION.format(value=values[0], count=VT_CHAIN_LENGTH)
  return _Spec(_VT_PREAMBLE, question, tuple(names[:VT_CHAIN_LENGTH]), _prose(rng, source, needles), asked=0,
               requested_depth=None)


def _common_words(rng: np.random.Generator, source: _Source, depth: float) -> _Spec:
  del depth
  chosen = rng.choice(len(source.vocabulary), COMMON_WORDS, replace=False)
  common = tuple(source.vocabulary[i] for i in chosen)
  list_seed = int(rng.integers(2**32))
  question = _CWE_QUESTION.format(count=COMMON_WORDS)
  return _Spec(_CWE_PREAMBLE, question, common, functools.partial(_word_list, source, common, list_seed),
               asked=None, requested_depth=None)


def _word_list(source: _Source, common: tuple[str, ...], seed: int, entries: int) -> tuple[str, list]:
  """A shuffled list of about `entries` words: each common word max(COMMON_MIN, COMMON_SHARE · entries)
  times, the rest distinct other words at most UNCOMMON_FREQ times each."""
  rng = np.random.default_rng([seed, entries])
  repeats = max(COMMON_MIN, round(COMMON_SHARE * entries))
  rest = max(0, entries - repeats * len(common))
  others = [word for word in source.vocabulary if word not in common]
  distinct = -(-rest // UNCOMMON_FREQ)
  if distinct > len(others):
    raise ValueError(f"a list of {entries} entries needs {distinct} distinct words; the corpus has {len(others)}")
  uncommon = [others[i] for i in rng.choice(len(others), distinct, replace=False)]
  listed = list(common) * repeats + (uncommon * UNCOMMON_FREQ)[:rest]
  return " ".join(listed[i] for i in rng.permutation(len(listed))), []


def _story_retrieval(rng: np.random.Generator, source: _Source, depth: float) -> _Spec:
  things = list(ATTRIBUTES)
  name, other = (NAMES[i] for i in rng.choice(len(NAMES), 2, replace=False))
  thing, other_thing = (things[i] for i in rng.choice(len(things), 2, replace=False))
  value, other_value = (ATTRIBUTES[thing][i] for i in rng.choice(len(ATTRIBUTES[thing]), 2, replace=False))
  # The asked fact, one sharing its thing (another value), one sharing its name, then random others.
  facts = [(name, thing, value), (other, thing, other_value),
           (name, other_thing, ATTRIBUTES[other_thing][rng.integers(len(ATTRIBUTES[other_thing]))])]
  while len(facts) < STORY_FACTS:
    who, what = NAMES[rng.integers(len(NAMES))], things[rng.integers(len(things))]
    if (who, what) not in {(fact[0], fact[1]) for fact in facts}:
      facts.append((who, what, ATTRIBUTES[what][rng.integers(len(ATTRIBUTES[what]))]))
  depths = [depth, *rng.uniform(0.0, 1.0, STORY_FACTS - 1)]
  needles = [(d, f"{who}'s {what} is {val}.") for d, (who, what, val) in zip(depths, facts)]
  return _Spec(_STORY_PREAMBLE, _STORY_QUESTION.format(name=name, thing=thing), (value,),
               _prose(rng, source, needles), asked=0, requested_depth=depth)


_BUILDERS: dict[str, Callable[[np.random.Generator, _Source, float], _Spec]] = {
    "niah_single": functools.partial(_niah, distractors=0),
    "niah_multikey": functools.partial(_niah, distractors=NIAH_DISTRACTORS),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "story_retrieval": _story_retrieval,
}
