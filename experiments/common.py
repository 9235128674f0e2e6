"""What every experiment shares: its two settings, the loaded model, AFBS-BO tuned once, and its outputs.

An experiment is a module `experiments/<name>.py` with a `run(setting, *, results_dir, work_dir) -> dict`
and an absl `main` (`python -m experiments.<name> [--quick]`). `QUICK` runs the tiny random-weight model
on short sequences in seconds (CI runs it, and checks the schema); `FULL` is the embedded SmolLM2-135M at
its full 8K context on one GPU. `Workbench` loads the model, tokenizer and corpus of a setting once and
answers the questions experiments ask: AFBS-BO's tuned parameters (tuned through the same pipeline as
`afbs_jax.main`, checkpointed under `work_dir` and reused by every experiment that asks for the same
band), the perplexity of any attention policy, and the sparsity a policy achieves on held-out text.
`write_results` writes `results/<name>.json`, the Markdown table generated from it and an optional
figure, with the machine, software and commit that produced them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

import configs
from afbs_jax import checkpoint, data, pipeline, report
from afbs_jax import eval as eval_lib
from afbs_jax.model import iter_layer_qkv



# Named apart from afbs_jax.main's --model_path and --backend: the test suite imports both modules into
# one process, and absl allows one definition per name.
_QUICK = flags.DEFINE_bool("quick", False, "CPU smoke setting: the tiny random model, short sequences.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Weights: a GGUF file or a Hugging Face directory (default: "
                               "the setting's model's).")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where results/<name>.{json,md,png} go.")
_WORK_DIR = flags.DEFINE_string("work_dir", os.path.join("outputs", "experiments"),
                                "Tuned checkpoints shared between experiments (resumable).")
_KERNEL_BACKEND = flags.DEFINE_string("kernel_backend", "auto", "Kernel backend of every sparse policy.")
_METHODS = flags.DEFINE_list("methods", None, "Measure only these methods (default: all the experiment's), "
                             "e.g. to split one experiment over two GPUs, each writing its own --results_dir.")
_MERGE_FROM = flags.DEFINE_list("merge_from", None, "Instead of measuring, join the partial results of these "
                                "directories (parts of one run: same setting, device kind and jax) into "
                                "--results_dir (experiments that can: pareto, frontier).")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One experiment setting.

  Attributes:
    name: "quick" or "full" (results of a quick run say so).
    model: a `configs` name.
    context, stride: perplexity's sliding window (the paper: the model's context, stride 512).
    max_eval_tokens: held-out tokens scored (0: the whole test split). FULL scores the first 32,768 test
      tokens (49 windows of 8K at stride 512): enough to separate the methods, and it keeps the
      token-level baselines, which score every (query, key) pair in every layer, within GPU call limits.
    low_len, high_len, num_validation: AFBS-BO's fidelities and validation inputs.
    block_size: block_q = block_k of the kernel, the tuner and the baselines.
    sparsities: the sparsity grid of sweeps (Pareto curves).
    bands: AFBS-BO's error bands for sweeps, [(ε_low, ε_high), ...], sparsest last.
  """

  name: str
  model: str
  context: int
  stride: int
  max_eval_tokens: int
  low_len: int
  high_len: int
  num_validation: int
  block_size: int
  sparsities: tuple[float, ...]
  bands: tuple[tuple[float, float], ...]


QUICK = Setting(name="quick", model="tiny", context=256, stride=128, max_eval_tokens=1024, low_len=128,
                high_len=256, num_validation=2, block_size=16, sparsities=(0.6,),
                bands=((0.045, 0.055), (0.09, 0.11)))
FULL = Setting(name="full", model="smollm2", context=8192, stride=512, max_eval_tokens=32768, low_len=2048,
               high_len=8192, num_validation=5, block_size=64, sparsities=(0.5, 0.6, 0.7, 0.8, 0.9),
               bands=((0.02, 0.03), (0.045, 0.055), (0.09, 0.11), (0.18, 0.22)))
PAPER_BAND = (0.045, 0.055)


def setting_from_flags() -> Setting:
  return QUICK if _QUICK.value else FULL


def results_dir_from_flags() -> str:
  return _RESULTS_DIR.value


def merge_from_flags() -> list[str] | None:
  """--merge_from: directories of partial results to join instead of measuring (None: measure)."""
  return _MERGE_FROM.value


def methods_from_flags() -> tuple[str, ...] | None:
  """--methods as a tuple (None: every method)."""
  return None if _METHODS.value is None else tuple(_METHODS.value)


def check_methods(methods: Sequence[str] | None, allowed: Sequence[str]) -> tuple[str, ...]:
  """`methods` (None: all of `allowed`) as a tuple, or a ValueError naming the unknown ones."""
  if methods is None:
    return tuple(allowed)
  unknown = [method for method in methods if method not in allowed]
  if unknown or not methods:
    raise ValueError(f"unknown methods {', '.join(unknown) or '(none given)'}; choose from: {', '.join(allowed)}")
  return tuple(methods)


def run_from_flags(run: Callable[..., dict[str, Any]], **options: Any) -> dict[str, Any]:
  """What an experiment's `main` does: run the flag-chosen setting and write where the flags say."""
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  if _METHODS.value is not None and "methods" not in options:
    # Every experiment shares this module's flags; one that cannot restrict its methods must not seem to.
    raise app.UsageError("--methods is not supported by this experiment (experiments.pareto takes it)")
  return run(setting_from_flags(), results_dir=_RESULTS_DIR.value, work_dir=_WORK_DIR.value,
             backend=_KERNEL_BACKEND.value, model_path=_WEIGHTS.value, **options)


class Workbench:
  """The model, tokenizer, held-out tokens and tuned parameters of one setting, loaded once.

  Args:
    setting: QUICK, FULL or a variant.
    work_dir: where tuned checkpoints live (one per setting, tuner and band; reused and resumed).
    backend: kernel backend for every sparse policy.
    model_path: weights other than the config's default.
    dataset: a corpus name (`afbs_jax.data.CORPUS_NAMES` or text:PATH) other than the config's.
    progress: show progress bars.
  """

  def __init__(self, setting: Setting, *, work_dir: str, backend: str = "auto", model_path: str | None = None,
               dataset: str | None = None, progress: bool = False):
    self.setting = setting
    self.work_dir = work_dir
    self.backend = backend
    self.config = self._config(model_path, dataset, progress)
    self.model, self.tokenizer = pipeline.load_model(self.config)
    self.corpus = data.load_corpus(self.config.dataset)
    self.eval_tokens = self.tokens_of(self.corpus.test)

  def _config(self, model_path: str | None, dataset: str | None, progress: bool):
    setting = self.setting
    config = configs.get_config(setting.model)
    config.tune.update(dict(low_len=setting.low_len, high_len=setting.high_len, block_q=setting.block_size,
                            block_k=setting.block_size, num_validation=setting.num_validation))
    config.eval.update(dict(context=setting.context, stride=min(setting.stride, setting.context),
                            max_eval_tokens=setting.max_eval_tokens))
    if model_path:
      config.model_path = model_path
    if dataset:
      config.dataset = dataset
    config.backend, config.tuner, config.mode, config.progress = self.backend, "afbs", "all", progress
    return config

  def tokens_of(self, text: str) -> np.ndarray:
    """Held-out text as int32 token ids, cut to the setting's max_eval_tokens."""
    add_bos = bool(self.config.eval.get("add_bos", False)) and self.tokenizer.bos_id is not None
    tokens = eval_lib.corpus_token_ids(self.tokenizer, text, add_bos=add_bos)
    return tokens[:self.setting.max_eval_tokens] if self.setting.max_eval_tokens else tokens

  # --------------------------------------------------------------------------------------- tuning

  def checkpoint_dir(self, tuner: str, band: tuple[float, float], **variant: Any) -> str:
    tags = "".join(f"_{key}{value}" for key, value in sorted(variant.items()))
    # The corpus is part of the name: parameters tuned on one corpus must not be reused for another.
    corpus = self.config.dataset.replace(os.sep, "_").replace(":", "_")
    name = f"{self.setting.name}_{self.setting.model}_{corpus}_{tuner}_eps{band[0]:g}-{band[1]:g}{tags}"
    return os.path.abspath(os.path.join(self.work_dir, name, "checkpoint"))

  def tune(self, band: tuple[float, float] = PAPER_BAND, *, tuner: str = "afbs", **tune_overrides: Any):
    """The tuned parameters (`TunedParams`) for an error band; tuned on first use, then loaded.

    `tune_overrides` change fields of the config's tune section (e.g. block_q, bo_iters) and are part of
    the checkpoint's name.
    """
    return self._load_or_tune(pipeline.tune, self.checkpoint_dir(tuner, band, **tune_overrides),
                              self._band_config(band, tuner, **tune_overrides))

  def tune_decode(self, band: tuple[float, float] = PAPER_BAND) -> Any:
    """AFBS-BO's decode thresholds (`TunedParams` of `DecodeMethod`) for an error band: `pipeline.tune_decode`
    (what `afbs_jax.main --tune_decode` runs) with the band's config, into the decode sub-directory of the
    band's prefill checkpoint, so `checkpoint.load_tuned` of that checkpoint attaches them as `tuned.decode`.
    Tuned on first use, then loaded; a partial checkpoint resumes at its first untuned layer."""
    return self._load_or_tune(pipeline.tune_decode, checkpoint.decode_checkpoint_dir(self.checkpoint_dir("afbs", band)),
                              self._band_config(band, "afbs"))

  def _band_config(self, band: tuple[float, float], tuner: str, **tune_overrides: Any):
    config = self.config.copy_and_resolve_references()
    config.tune.update(dict(eps_low=band[0], eps_high=band[1], **tune_overrides))
    config.tuner = tuner
    return config

  def _load_or_tune(self, tune: Callable[..., Any], directory: str, config: Any):
    """The complete checkpoint in `directory`, else `tune(...)` into it (resuming a partial one)."""
    if checkpoint.has_checkpoint(directory):
      tuned = checkpoint.load_tuned(directory)
      if tuned.complete:
        return tuned
    return tune(self.model, self.tokenizer, self.corpus.train, config, checkpoint_dir=directory).tuned

  def tuned_policy(self, tuned) -> Any:
    return checkpoint.attention_policy(tuned, backend=self.backend)

  # ------------------------------------------------------------------------------------ measuring

  def perplexity(self, policy: Any | None = None, *, tokens: np.ndarray | None = None,
                 context: int | None = None) -> float:
    """Sliding-window perplexity of the model with `policy` (None: dense) on the held-out tokens."""
    model = self.model if policy is None else self.model.with_attention(policy)
    context = context or self.setting.context
    tokens = self.eval_tokens if tokens is None else tokens
    # Every policy, token-level baselines included, runs the config's batch of windows. Those baselines
    # select and attend `query_chunk` query rows at a time (afbs_jax.baselines.chunks), so a layer holds
    # about ten f32 [batch, heads, 512, S] arrays at once, not [batch, heads, T, S] ones: at SmolLM2's 9
    # heads, 8K and batch 4 about 6 GB, next to the 6.4 GB of f32 logits a dense batch of 4 already holds.
    return float(eval_lib.perplexity_with_stats(
        model, tokens, context=context, stride=min(self.setting.stride, context),
        batch_size=int(self.config.eval.batch_size), progress=False).ppl)

  def sparsity(self, policy: Any, *, length: int | None = None, tokens: np.ndarray | None = None) -> dict[str, Any]:
    """What `policy` keeps on the first `length` of `tokens` (default: one context of the held-out tokens),
    every layer.

    Returns:
      {"sparsity": mean over layers, heads (the policy's own granularity: block sparsity for block
      policies and SpargeAttn, token sparsity for token-level baselines), "per_layer": [layers],
      "block_sparsity" and "token_sparsity" where the policy exposes its token mask}.
    """
    from afbs_jax.baselines import sparsity as sparsity_lib  # pylint: disable=g-import-not-at-top
    tokens = self.eval_tokens if tokens is None else np.asarray(tokens)
    length = min(length or self.setting.context, tokens.size)
    tokens = tokens[None, :length]
    own, blocks, tokens_kept = [], [], []
    for layer, q, k, v in iter_layer_qkv(self.model, tokens):
      _, achieved = policy.attend(q, k, v, layer=layer)
      own.append(float(np.mean(np.asarray(achieved))))
      if hasattr(policy, "token_mask"):
        mask = policy.token_mask(q, k, layer=layer)
        blocks.append(float(np.mean(np.asarray(sparsity_lib.block_sparsity(mask, self.setting.block_size)))))
        tokens_kept.append(float(np.mean(np.asarray(sparsity_lib.token_sparsity(mask)))))
    result = {"sparsity": float(np.mean(own)), "per_layer": own, "length": int(length)}
    if blocks:
      result |= {"block_sparsity": float(np.mean(blocks)), "token_sparsity": float(np.mean(tokens_kept))}
    return result

  def kv_cache_bytes(self, length: int | None = None) -> int:
    """A decoder's dense KV cache for `length` tokens (default: one context) in the weights' dtype."""
    model = self.model.config
    itemsize = np.dtype(jax.numpy.dtype(model.param_dtype)).itemsize
    return int(2 * model.num_layers * model.num_kv_heads * model.head_dim * (length or self.setting.context)
               * itemsize)


# ------------------------------------------------------------------------------------------ output


def environment() -> dict[str, Any]:
  """The machine, software and commit that produced a result."""
  # AFBS_COMMIT names the commit where the checkout's own git metadata does not (a copied work tree).
  commit = os.environ.get("AFBS_COMMIT", "")
  if not commit:
    try:
      commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip() or "unknown"
    except OSError:
      commit = "unknown"
  return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
          "date": datetime.date.today().isoformat(), "commit": commit}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """A Markdown table; floats at 3 significant decimals, None as an em dash."""
  def cell(value: Any) -> str:
    if value is None:
      return "—"
    if isinstance(value, float):
      return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
  return "\n".join(lines)


def _stem(name: str, results_dir: str, setting: Setting) -> str:
  return os.path.join(results_dir, name if setting.name == "full" else f"{name}_{setting.name}")


def read_results(name: str, *, results_dir: str, setting: Setting) -> dict[str, Any] | None:
  """What `write_results` wrote for this experiment and setting (None if nothing, or another setting)."""
  path = _stem(name, results_dir, setting) + ".json"
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    payload = json.load(f)
  return payload if payload.get("setting") == json.loads(json.dumps(dataclasses.asdict(setting))) else None


def read_partial_runs(name: str, sources: Sequence[str], *, setting: Setting,
                      same: Sequence[str]) -> list[dict[str, Any]]:
  """What `write_results` wrote for `name` in each source directory, checked to be parts of one run.

  Every source must hold results of `setting` (the same settings dataclass, field by field), measured on
  the same device kind, platform and jax version, with equal values of every payload field in `same`
  (e.g. the dense perplexity every ΔPPL is relative to; floats agree to `same_measurement`'s tolerance);
  otherwise a ValueError names the directory and what differs.
  """
  if not sources:
    raise ValueError(f"no {name} results to merge")
  expected = json.loads(json.dumps(dataclasses.asdict(setting)))
  runs = []
  for directory in sources:
    path = _stem(name, directory, setting) + ".json"
    if not os.path.isfile(path):
      raise ValueError(f"{path} does not exist: no {name} results of the {setting.name} setting in {directory}")
    with open(path, encoding="utf-8") as f:
      payload = json.load(f)
    if payload.get("setting") != expected:
      differ = sorted(key for key in expected if (payload.get("setting") or {}).get(key) != expected[key])
      raise ValueError(f"{path} was measured at another setting than {setting.name}'s (differs in "
                       f"{', '.join(differ)}); only parts of one run merge")
    runs.append((path, payload))
  first_path, first = runs[0]
  for path, payload in runs[1:]:
    for field in ("device", "platform", "jax"):
      if payload["environment"].get(field) != first["environment"].get(field):
        raise ValueError(f"{path} ran on {field} {payload['environment'].get(field)!r} and {first_path} on "
                         f"{first['environment'].get(field)!r}; only parts of one run merge")
    for field in same:
      if not same_measurement(payload.get(field), first.get(field)):
        raise ValueError(f"{path} has {field} = {payload.get(field)!r} and {first_path} {first.get(field)!r}; "
                         "only parts of one run merge")
  return [payload for _, payload in runs]


def merged_environment(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The environment of merged partial runs: the first run's, its commit naming every run's commit once
  (in order; a run that was itself a merge contributes each of its commits)."""
  commits = dict.fromkeys(c.strip() for run in runs for c in str(run["environment"].get("commit", "")).split(","))
  return dict(runs[0]["environment"]) | {"commit": ", ".join(c for c in commits if c)}


def same_measurement(a: Any, b: Any) -> bool:
  """Equal, floats to 1e-6 relative: the same quantity measured twice on one device kind can differ in the
  last digits (a batched forward sums in another order; e.g. a dense perplexity 27.2890996518 vs
  27.2890996289), where a different run (another model, corpus or length) differs in the first digits."""
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def union(parts: Sequence[Sequence[dict[str, Any]]], key: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
  """The entries of every part in order, each `key` once: the first part that holds it wins."""
  seen, merged = set(), []
  for part in parts:
    for entry in part:
      if key(entry) not in seen:
        seen.add(key(entry))
        merged.append(entry)
  return merged


def write_results(name: str, payload: Mapping[str, Any], markdown: str, *, results_dir: str,
                  setting: Setting, figure: Callable[[str], None] | None = None,
                  env: Mapping[str, Any] | None = None) -> str:
  """Writes <results_dir>/<name>[_quick].json, .md (and .png via `figure(path)`); returns the JSON path.

  Quick runs get a `_quick` suffix, so they never overwrite full results. `env` is the machine that
  measured the results (default: this one, `environment()`); a merge of partial runs passes theirs.
  """
  os.makedirs(results_dir, exist_ok=True)
  stem = _stem(name, results_dir, setting)
  env = dict(env) if env is not None else environment()
  full_payload = {"experiment": name, "setting": dataclasses.asdict(setting), "environment": env, **payload}
  report.write_json(stem + ".json", full_payload)
  command = f"python -m experiments.{name}" + ("" if setting.name == "full" else f" --{setting.name}")
  header = (f"Generated by `{command}` from `{os.path.basename(stem)}.json`: {setting.model}, context "
            f"{setting.context}, block {setting.block_size}, on {env['device']} ({env['platform']}), jax "
            f"{env['jax']}, {env['date']}, commit {env['commit']}.")
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(f"# {name}\n\n{header}\n\n{markdown.strip()}\n")
  if figure is not None:
    figure(stem + ".png")
  return stem + ".json"


def new_figure(rows: int = 1, cols: int = 1, *, size: tuple[float, float] = (6.0, 4.0)):
  """(figure, axes) from matplotlib's Agg backend, which needs no display."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(rows, cols, figsize=size)


def save_figure(figure: Any, path: str) -> None:
  """Lays out, writes (PNG, 120 dpi) and closes `figure`."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def main_for(run: Callable[..., dict[str, Any]], render: Callable[[dict[str, Any]], str],
             discuss: Callable[[dict[str, Any]], str] | None = None,
             **options: Callable[[], Any]) -> Callable[[list[str]], None]:
  """An experiment's absl `main`: run the flag-chosen setting, then print its table and discussion.

  `options` maps extra `run` keyword arguments to zero-argument callables read after flag parsing (e.g.
  a module's own flag's value).
  """
  def main(argv: list[str]) -> None:
    del argv
    if merge_from_flags():   # main_with_merge handles it where an experiment can merge
      raise app.UsageError("--merge_from: this experiment does not merge partial results (pareto and frontier "
                           "do); drop the flag to measure")
    payload = run_from_flags(run, **{name: value() for name, value in options.items()})
    print(render(payload) + ("\n\n" + discuss(payload) if discuss is not None else ""))
  return main


def main_with_merge(measure: Callable[[list[str]], None], merge: Callable[..., dict[str, Any]],
                    render: Callable[[dict[str, Any]], str],
                    discuss: Callable[[dict[str, Any]], str]) -> Callable[[list[str]], None]:
  """An absl `main` that joins `--merge_from`'s partial results with `merge(setting, sources, results_dir=)`
  when the flag is given, and otherwise measures with `measure` (a `main_for` main)."""
  def main(argv: list[str]) -> None:
    sources = merge_from_flags()
    if not sources:
      measure(argv)
      return
    payload = merge(setting_from_flags(), sources, results_dir=results_dir_from_flags())
    print(render(payload) + "\n\n" + discuss(payload))
  return main

