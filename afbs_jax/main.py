"""Entry point: tune a Llama's per-head SpargeAttn thresholds with AFBS-BO, then compare perplexities.

    python -m afbs_jax.main                       # SmolLM2-135M (embedded GGUF) on bundled SOTU text
    python -m afbs_jax.main --model=tiny --high_len=256 --low_len=128 --output_dir=/tmp/tiny
    python -m afbs_jax.main --model=llama2 --model_path=/path/to/Llama-2-7b-hf --dataset=wikitext2
    python -m afbs_jax.main --model=llama2 --model_path=/path/to/Llama-2-7b-hf --dataset=wikitext2 --mode=dense

Flags override fields of `configs.get_config(--model)`; the resolved config is written as `config.json`
beside `results.json` and `sparsity_heatmap.png` in `--output_dir` (default `outputs/<model>`). Tuning
checkpoints every layer under `<output_dir>/checkpoint` and resumes from there. Invalid flags exit with
status 2 and a one-line reason. `main` only parses flags; `resolve_config` and `run` do the work and
can be called from Python.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging

MODES = ("tune", "eval", "all", "dense")
MODELS = ("smollm2", "llama2", "llama2-13b", "tiny")
# Kept here rather than imported from afbs_jax.tuner.model_tuning so that flag parsing needs no JAX import;
# tests/test_main.py checks that the two lists agree.
TUNERS = ("afbs", "spargeattn_grid", "s_grid")
ACQUISITIONS = ("band", "paper")

_MODEL = flags.DEFINE_enum("model", "smollm2", MODELS, "Model config.")
_MODEL_PATH = flags.DEFINE_string("model_path", None, "Weights: a GGUF file or a Hugging Face directory "
                                  "(default: the config's; the embedded GGUF for smollm2).")
_DATASET = flags.DEFINE_string("dataset", None, "Corpus: sotu, wikitext2 or text:PATH (default: config's).")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "Tune, evaluate a tuned checkpoint, both, or only "
                          "measure dense perplexity (no tuning).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Results directory (default outputs/<model>).")
_EPS_LOW = flags.DEFINE_float("eps_low", None, "Lower edge of the error band (relative L1).")
_EPS_HIGH = flags.DEFINE_float("eps_high", None, "Upper edge of the error band (relative L1).")
_LOW_LEN = flags.DEFINE_integer("low_len", None, "Low-fidelity length in tokens (a prefix of the calibration input).")
_HIGH_LEN = flags.DEFINE_integer("high_len", None, "High-fidelity length in tokens (calibration/validation inputs).")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", None, "Block size (block_q = block_k), a power of two.")
_ACQUISITION = flags.DEFINE_enum("acquisition", None, ACQUISITIONS, "AFBS-BO acquisition (default: config's).")
_SEED = flags.DEFINE_integer("seed", None, "Seed (tuner; the tiny model's random weights).")
_NUM_VALIDATION = flags.DEFINE_integer("num_validation", None, "Validation inputs for stage 3.")
_EVAL_CONTEXT = flags.DEFINE_integer("eval_context", None, "Perplexity context window in tokens.")
_MAX_EVAL_TOKENS = flags.DEFINE_integer("max_eval_tokens", None, "Held-out tokens scored (upper bound; 0 = all).")
_TUNER = flags.DEFINE_enum("tuner", "afbs", TUNERS, "Tuner: AFBS-BO or a grid baseline on the same evaluator.")
_BACKEND = flags.DEFINE_string("backend", "auto", "Kernel backend for kernels.sparge (auto picks per platform).")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show progress bars.")

# Flags that override numeric fields of the config: flag -> (section, field, type).
_NUMERIC_OVERRIDES = {
    "eps_low": ("tune", "eps_low", float),
    "eps_high": ("tune", "eps_high", float),
    "low_len": ("tune", "low_len", int),
    "high_len": ("tune", "high_len", int),
    "block_size": ("tune", "block_size", int),
    "seed": ("tune", "seed", int),
    "num_validation": ("tune", "num_validation", int),
    "eval_context": ("eval", "context", int),
    "max_eval_tokens": ("eval", "max_eval_tokens", int),
}


class FlagError(ValueError):
  """A flag value that cannot be used; main prints its message on one line and exits with status 2."""


# ----------------------------------------------------------------------------------------------
# Config resolution and validation
# ----------------------------------------------------------------------------------------------


def resolve_config(values: dict[str, Any]) -> Any:
  """The model's config with flag `values` (flag name -> value, a string, or None = config's) applied.

  Raises:
    FlagError: unknown model/mode/tuner, unparsable or inconsistent values, missing paths.
  """
  import configs  # pylint: disable=g-import-not-at-top
  model = values.get("model") or "smollm2"
  if model not in MODELS:
    raise FlagError(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
  _check_choice("mode", values.get("mode") or "all", MODES)
  _check_choice("tuner", values.get("tuner") or "afbs", TUNERS)
  config = configs.get_config(model)
  for name, (section, field, kind) in _NUMERIC_OVERRIDES.items():
    if values.get(name) is not None:
      config[section][field] = _parse_number(name, values[name], kind)
  if values.get("acquisition") is not None:
    config.tune.acquisition = _check_choice("acquisition", values["acquisition"], ACQUISITIONS)
  if values.get("model_path"):
    config.model_path = values["model_path"]
  if values.get("dataset"):
    config.dataset = values["dataset"]
  # A window can start at most `context` tokens after the previous one (the recipe needs stride <= context).
  config.eval.stride = min(int(config.eval.stride), int(config.eval.context))
  config.mode = values.get("mode") or "all"
  config.tuner = values.get("tuner") or "afbs"
  config.backend = values.get("backend") or "auto"
  config.output_dir = values.get("output_dir") or os.path.join("outputs", model)
  validate_config(config)
  return config


def validate_config(config: Any) -> None:
  """Raises FlagError (one line) unless the resolved config can run."""
  tune, evaluation, model = config.tune, config.eval, config.model
  if not 0.0 <= tune.eps_low <= tune.eps_high:
    raise FlagError(f"need 0 <= --eps_low <= --eps_high; got eps_low={tune.eps_low}, eps_high={tune.eps_high}")
  block = tune.block_size
  if block < 8 or block & (block - 1):
    raise FlagError(f"--block_size must be a power of two >= 8; got {block}")
  if tune.low_len < 1 or tune.high_len < 1:
    raise FlagError(f"--low_len and --high_len must be positive; got {tune.low_len}, {tune.high_len}")
  if tune.low_len > tune.high_len:
    raise FlagError(f"--low_len ({tune.low_len}) must not exceed --high_len ({tune.high_len})")
  context_limit = model.max_position_embeddings
  for name, length in (("high_len", tune.high_len), ("eval_context", evaluation.context)):
    if length > context_limit:
      raise FlagError(f"--{name}={length} exceeds {model.name}'s context of {context_limit} tokens")
  if evaluation.context < 2:
    raise FlagError(f"--eval_context must be >= 2; got {evaluation.context}")
  if evaluation.max_eval_tokens < 0 or evaluation.max_eval_tokens == 1:
    raise FlagError(f"--max_eval_tokens must be 0 (no bound) or >= 2; got {evaluation.max_eval_tokens}")
  if tune.num_validation < 1:
    raise FlagError(f"--num_validation must be >= 1; got {tune.num_validation}")
  if tune.seed < 0:
    raise FlagError(f"--seed must be >= 0; got {tune.seed}")
  _check_model_path(config)
  _check_dataset(config.dataset)


def _check_model_path(config: Any) -> None:
  path = config.get("model_path", "")
  if config.model_format == "random":
    return
  if not path:
    if config.model_format == "gguf":
      return  # The embedded default GGUF; the loader says how to install it when it is missing.
    raise FlagError(f"--model_path is required for --model={config.model_name} (a Hugging Face directory)")
  if not os.path.exists(path):
    raise FlagError(f"--model_path {path!r} does not exist")


def _check_dataset(dataset: str) -> None:
  if dataset in ("sotu", "wikitext2"):
    return
  if dataset.startswith("text:"):
    path = dataset[len("text:"):]
    if not path or not os.path.exists(path):
      raise FlagError(f"--dataset text:PATH needs an existing file or directory; got {path!r}")
    return
  raise FlagError(f"--dataset must be sotu, wikitext2 or text:PATH; got {dataset!r}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
  if value not in allowed:
    raise FlagError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")
  return value


def _parse_number(name: str, text: str, kind: type) -> int | float:
  try:
    value = kind(text)
  except (TypeError, ValueError):
    raise FlagError(f"--{name} must be {'an integer' if kind is int else 'a number'}; got {text!r}") from None
  if kind is float and value != value:  # NaN
    raise FlagError(f"--{name} must be a number; got {text!r}")
  return value


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def load_model(config: Any) -> tuple[Any, Any]:
  """(model, tokenizer) for the config's model_format: gguf, hf or random (seeded)."""
  from afbs_jax import calibration  # pylint: disable=g-import-not-at-top
  from afbs_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  if config.model_format == "gguf":
    return model_lib.load_gguf(config.model_path or None)
  if config.model_format == "hf":
    return model_lib.load_hf(config.model_path)
  if config.model_format == "random":
    tokenizer = calibration.ByteTokenizer()
    if config.model.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"a random-weight model reads UTF-8 bytes and needs vocab_size >= 256; "
                       f"got {config.model.vocab_size}")
    return model_lib.init_random(config.model, seed=int(config.tune.seed)), tokenizer
  raise FlagError(f"config.model_format must be gguf, hf or random; got {config.model_format!r}")


def run(config: Any) -> dict[str, Any]:
  """Runs the resolved config (tune, eval or both) and writes results into config.output_dir."""
  import jax  # pylint: disable=g-import-not-at-top

  from afbs_jax import checkpoint, data, report  # pylint: disable=g-import-not-at-top
  output_dir = config.output_dir
  os.makedirs(output_dir, exist_ok=True)
  report.write_json(os.path.join(output_dir, report.CONFIG_FILE), config)
  checkpoint_dir = os.path.join(os.path.abspath(output_dir), "checkpoint")
  # --mode=eval needs a finished tuning run; say so before spending time on the model.
  saved = checkpoint.load_tuned(checkpoint_dir) if config.mode == "eval" else None
  model, tokenizer = load_model(config)
  corpus = data.load_corpus(config.dataset)
  results: dict[str, Any] = {"model": config.model_name, "dataset": config.dataset, "tuner": config.tuner,
                             "device": jax.devices()[0].device_kind, "mode": config.mode}
  tuned = None  # --mode=dense measures the dense model only.
  if saved is not None:
    saved.check_compatible(model.config, config.tune.block_size,
                           weights_hash=checkpoint.weights_fingerprint(model))
    results["tuner"] = saved.metadata.get("tuner", config.tuner)
    tuned = saved
  elif config.mode != "dense":
    tuned_result = tune(model, tokenizer, corpus.train, config, checkpoint_dir=checkpoint_dir)
    results["tune"] = _tune_results(tuned_result, config)
    tuned = tuned_result.tuned
  if tuned is not None:
    results["tuned"] = {name: getattr(tuned, name) for name in checkpoint.ARRAY_NAMES}
  if config.mode in ("eval", "all", "dense"):
    results["eval"] = evaluate_perplexity(model, tokenizer, corpus.test, tuned, config)
  report.write_json(os.path.join(output_dir, report.RESULTS_FILE), results)
  if tuned is not None:
    report.save_sparsity_heatmap(tuned.sparsity, os.path.join(output_dir, report.HEATMAP_FILE),
                                 title=f"{config.model_name}: block sparsity per head ({config.tuner})")
  print(report.format_summary(results))
  print(f"results: {os.path.join(output_dir, report.RESULTS_FILE)}")
  return results


def tune(model: Any, tokenizer: Any, train_text: str, config: Any, *, checkpoint_dir: str) -> Any:
  """Cuts calibration + validation inputs from `train_text` and tunes every layer (resumable)."""
  from afbs_jax import calibration  # pylint: disable=g-import-not-at-top
  from afbs_jax.tuner import model_tuning  # pylint: disable=g-import-not-at-top
  tokens = calibration.calibration_tokens(tokenizer, train_text, num_inputs=1 + config.tune.num_validation,
                                          length=config.tune.high_len)
  return model_tuning.tune_model(model, tokens, config, checkpoint_dir=checkpoint_dir,
                                 progress=config.get("progress", True), tuner=config.tuner,
                                 backend=config.backend)


def _tune_results(tuned_result: Any, config: Any) -> dict[str, Any]:
  from afbs_jax import report  # pylint: disable=g-import-not-at-top
  tuned = tuned_result.tuned
  layers = [stats.as_dict() for stats in tuned_result.layer_stats]
  return {
      "layers": layers,
      "overall": report.overall_stats(tuned.sparsity, tuned.error, eps_low=config.tune.eps_low,
                                      eps_high=config.tune.eps_high, layers_done=tuned.layers_done),
      "band": [config.tune.eps_low, config.tune.eps_high],
      "total_calls": int(sum(stats["num_calls"] for stats in layers)),
      "total_launches": int(sum(stats["launches"] for stats in layers)),
      "wall_time_s": float(tuned_result.wall_time_s),
      "layers_done": tuned.layers_done,
      "num_layers": tuned.num_layers,
      "layers_resumed": int(tuned_result.layers_resumed),
      "metadata": tuned.metadata,
  }


def evaluate_perplexity(model: Any, tokenizer: Any, text: str, tuned: Any | None,
                        config: Any) -> dict[str, Any]:
  """Dense vs sparse (tuned SpargeAttention) perplexity on held-out `text`, bounded by max_eval_tokens.

  With `tuned=None` only the dense perplexity is measured (`--mode=dense`).
  """
  from afbs_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from afbs_jax.model import SpargeAttention  # pylint: disable=g-import-not-at-top
  add_bos = bool(config.eval.get("add_bos", False)) and tokenizer.bos_id is not None
  tokens = eval_lib.corpus_token_ids(tokenizer, text, add_bos=add_bos)
  if config.eval.max_eval_tokens:
    tokens = tokens[: int(config.eval.max_eval_tokens)]
  options = dict(context=int(config.eval.context), stride=int(config.eval.stride),
                 batch_size=int(config.eval.batch_size), progress=bool(config.get("progress", True)))
  start = time.perf_counter()
  dense = eval_lib.perplexity_with_stats(model, tokens, **options)
  results = {"dense_ppl": dense.ppl, "num_tokens": int(tokens.size), "num_scored": int(dense.num_scored),
             "context": options["context"], "stride": options["stride"],
             "dense_tokens_per_s": dense.tokens_per_second}
  if tuned is not None:
    block = int(config.tune.block_size)
    # The sink flag the parameters were tuned with, so that evaluation runs exactly what was validated.
    sink = bool(tuned.metadata.get("attention_sink", config.tune.get("attention_sink", True)))
    sparse_model = model.with_attention(SpargeAttention(tuned.tau, tuned.theta, tuned.lam, block_q=block,
                                                        block_k=block, backend=config.backend,
                                                        attention_sink=sink))
    sparse = eval_lib.perplexity_with_stats(sparse_model, tokens, **options)
    results |= {"sparse_ppl": sparse.ppl, "sparse_tokens_per_s": sparse.tokens_per_second}
  return results | {"wall_time_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# absl entry point
# ----------------------------------------------------------------------------------------------


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad flag on one line with exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(str(e).splitlines()[0])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _exit_with(f"unexpected positional arguments: {' '.join(argv[1:])}")
  names = ["model", "model_path", "dataset", "mode", "output_dir", "acquisition", "tuner", "backend",
           *_NUMERIC_OVERRIDES]
  try:
    config = resolve_config({name: flags.FLAGS[name].value for name in names})
  except FlagError as e:
    _exit_with(str(e))
  config.progress = _PROGRESS.value
  # Orbax logs every checkpoint step at INFO; the progress bars and the summary are the output.
  logging.set_verbosity(logging.WARNING)
  from afbs_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from afbs_jax.data import CorpusUnavailableError  # pylint: disable=g-import-not-at-top
  try:
    run(config)
  except (CheckpointError, CorpusUnavailableError) as e:
    # --mode=eval before any tuning, or a corpus that cannot be fetched: usage errors, not crashes.
    _exit_with(str(e).splitlines()[0])


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
