"""experiments.downstream: task records -> examples, continuation scoring against brute force, offline exit."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import configs
from afbs_jax import pipeline
from experiments import common, downstream

REPO = pathlib.Path(__file__).resolve().parents[2]
# Contexts and choices of different lengths; the last context outgrows MAX_LENGTH and is cut from the left.
SYNTHETIC = (
    downstream.Example("The sky on a clear day is", ("blue.", "green.", "made of cheese."), 0),
    downstream.Example("Question: how do you boil water?\nAnswer:", ("Heat it in a pot.", "Freeze it."), 1),
    downstream.Example("A long story. " * 20 + "It ends", ("well.", "badly, as all stories do.", "now.",
                                                         "with a twist."), 3),
)
MAX_LENGTH = 256  # the quick setting's context


@pytest.fixture(scope="module")
def tiny():
  return pipeline.load_model(configs.get_config("tiny"))


@pytest.fixture(scope="module")
def brute(tiny):
  return [_brute_force_logprobs(*tiny, example) for example in SYNTHETIC]


def _brute_force_logprobs(model, tokenizer, example: downstream.Example) -> np.ndarray:
  """Each choice's summed log-probability from one unpadded forward pass per choice."""
  scores = []
  for choice in example.choices:
    context_ids, choice_ids = tokenizer.encode(example.context), tokenizer.encode(" " + choice)
    ids = context_ids + choice_ids  # bytes: the pair's encoding is the concatenation
    cut = max(0, len(ids) - (MAX_LENGTH + 1))  # the model sees at most MAX_LENGTH tokens, the last ones
    ids, first_scored = ids[cut:], len(context_ids) - cut
    logits = model(np.asarray([ids[:-1]], np.int32))[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1), np.float64)
    scores.append(sum(logp[position - 1, ids[position]] for position in range(first_scored, len(ids))))
  return np.array(scores)


def test_scoring_matches_brute_force_argmax_of_summed_logprobs(tiny, brute):
  model, tokenizer = tiny
  assert len(SYNTHETIC[2].context) + 5 > MAX_LENGTH  # the truncation path is exercised
  scored = downstream.continuation_logprobs(model, tokenizer, SYNTHETIC, max_length=MAX_LENGTH, bucket=16,
                                            batch_size=4)
  for ours, theirs in zip(scored, brute):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
  labels = np.array([example.label for example in SYNTHETIC])
  expected_acc = np.mean([np.argmax(theirs) for theirs in brute] == labels)
  lengths = [np.array([len(choice) for choice in example.choices]) for example in SYNTHETIC]
  expected_norm = np.mean([np.argmax(theirs / length) for theirs, length in zip(brute, lengths)] == labels)
  result = downstream.accuracy(SYNTHETIC, scored)
  assert result == {"acc": expected_acc, "acc_norm": expected_norm, "examples": 3}


def test_task_records_map_to_lm_eval_prompts():
  hellaswag = downstream.TASKS["hellaswag"].to_example({
      "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
      "ctx_b": "then", "endings": ["a [title] b", " c d ", "e", "f"], "label": "3"})
  assert hellaswag == downstream.Example("Removing ice from car: Then, the man writes over the snow. Then",
                                         ("a. b", "c d", "e", "f"), 3)
  piqa = downstream.TASKS["piqa"].to_example({"goal": "Open a jar", "sol1": "Twist.", "sol2": "Pull.", "label": 0})
  assert piqa == downstream.Example("Question: Open a jar\nAnswer:", ("Twist.", "Pull."), 0)
  boolq = downstream.TASKS["boolq"].to_example({"passage": "Water is wet.", "question": "is water wet",
                                                "answer": True})
  assert boolq == downstream.Example("Water is wet.\nQuestion: is water wet?\nAnswer:", ("no", "yes"), 1)


def test_offline_prints_one_line_and_exits_2(tmp_path):
  env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
  # A closed local port: the hub probe fails at once, and an empty cache holds no copy.
  env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "JAX_PLATFORMS": "cpu"}
  completed = subprocess.run(
      [sys.executable, "-m", "experiments.downstream", "--quick", f"--results_dir={tmp_path / 'results'}",
       f"--work_dir={tmp_path / 'work'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert completed.returncode == downstream.UNAVAILABLE_EXIT_CODE == 2, completed.stderr
  lines = [line for line in completed.stderr.splitlines() if "datasets are unavailable" in line]
  assert len(lines) == 1 and "127.0.0.1:9" in lines[0]
  assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_quick_run_on_synthetic_tasks(tmp_path, work_dir, brute):
  payload = downstream.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference",
                           examples={"synthetic": SYNTHETIC})
  assert (tmp_path / "downstream_quick.json").is_file() and (tmp_path / "downstream_quick.md").is_file()
  assert [row["method"] for row in payload["rows"]] == list(downstream.METHODS)
  assert 0.0 < payload["target_sparsity"] < 1.0
  dense = payload["rows"][0]["tasks"]["synthetic"]
  assert dense["acc"] == np.mean([np.argmax(b) for b in brute] == np.array([e.label for e in SYNTHETIC]))
  for row in payload["rows"]:
    scores = row["tasks"]["synthetic"]
    assert scores["examples"] == 3 and scores["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)
  discussion = downstream.discuss(payload)
  assert "Llama-2-7B" in discussion and "tiny" in discussion
