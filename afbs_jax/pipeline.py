"""The run behind the command line, importable: load the model, tune it, evaluate it, write the results.

`run(config)` takes a resolved config (`configs.get_config(name)` plus overrides, as `afbs_jax.main`
builds it) and does the whole job: load the model and corpus, tune every layer (resumable, one
checkpoint step per layer) or load a finished checkpoint, measure dense and sparse perplexity, and write
`config.json`, `results.json` and the sparsity heatmap into `config.output_dir`; or, for
`config.mode == "generate"`, continue a prompt (`generate_text`, which writes nothing). With
`config.tune_decode` a tuning run also tunes per-head decode thresholds after the prefill ones (`tune_decode`,
stored in the checkpoint's decode section, used by `generate_text`). Each step is its own function
(`load_model`, `tune`, `tune_decode`, `evaluate_perplexity`, `generate_text`), so experiments and benchmarks call
the same code the command line runs. What the user can get wrong is raised typed (`afbs_jax.errors`), and Ctrl-C during
tuning becomes `Interrupted`, saying how many layers are saved for a rerun to resume.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax

from afbs_jax import calibration, checkpoint, data, report
from afbs_jax import eval as eval_lib
from afbs_jax import model as model_lib
from afbs_jax.errors import InputFileError, Interrupted, UserInputError
from afbs_jax.model import generation
from afbs_jax.tuner import model_tuning


def load_model(config: Any) -> tuple[Any, Any]:
  """(model, tokenizer) for the config's model_format: gguf, hf or random (seeded)."""
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
  raise ValueError(f"config.model_format must be gguf, hf or random; got {config.model_format!r}")


def run(config: Any) -> dict[str, Any]:
  """Runs the resolved config (tune, eval or both) and writes results into config.output_dir."""
  if config.mode == "generate":
    return generate_text(config)
  output_dir = config.output_dir
  _start_output_dir(output_dir, config)
  checkpoint_dir = os.path.join(os.path.abspath(output_dir), "checkpoint")
  # --mode=eval needs a finished tuning run; say so before spending time on the model.
  saved = checkpoint.load_tuned(checkpoint_dir) if config.mode == "eval" else None
  corpus = data.load_corpus(config.dataset)  # before the model: an unusable text is found at once
  model, tokenizer = load_model(config)
  results: dict[str, Any] = {"model": config.model_name, "dataset": config.dataset, "tuner": config.tuner,
                             "device": jax.devices()[0].device_kind, "mode": config.mode}
  tuned = None  # --mode=dense measures the dense model only.
  if saved is not None:
    saved.check_compatible(model.config, model_tuning.blocks_from_config(config.tune),
                           weights_hash=checkpoint.weights_fingerprint(model))
    results["tuner"] = saved.metadata.get("tuner", config.tuner)
    tuned = saved
  elif config.mode != "dense":
    tuned_result = tune(model, tokenizer, corpus.train, config, checkpoint_dir=checkpoint_dir)
    results["tune"] = _tune_results(tuned_result, config)
    tuned = tuned_result.tuned
    if config.get("tune_decode", False):
      decode_result = tune_decode(model, tokenizer, corpus.train, config,
                                  checkpoint_dir=checkpoint.decode_checkpoint_dir(checkpoint_dir))
      results["tune_decode"] = _tune_results(decode_result, config)
      tuned.decode = decode_result.tuned
  if tuned is not None:
    results["tuned"] = tuned.tables()
  if tuned is not None and tuned.decode is not None:
    results["tuned_decode"] = tuned.decode.tables()
  if config.mode in ("eval", "all", "dense"):
    results["eval"] = evaluate_perplexity(model, tokenizer, corpus.test, tuned, config)
  report.write_json(os.path.join(output_dir, report.RESULTS_FILE), results)
  if tuned is not None:
    report.save_sparsity_heatmap(tuned.sparsity, os.path.join(output_dir, report.HEATMAP_FILE),
                                 title=f"{config.model_name}: block sparsity per head ({config.tuner})")
  print(report.format_summary(results))
  print(f"results: {os.path.join(output_dir, report.RESULTS_FILE)}")
  return results


def generate_text(config: Any) -> dict[str, Any]:
  """--mode=generate: prints the continuation of config.generate.prompt on stdout and returns it.

  The prefill runs the tuned sparse policy when `<output_dir>/checkpoint` holds one for this model (its
  own method and blocks; untuned layers are dense-equivalent), else dense attention; decode steps run the
  tuned decode τ when the checkpoint holds decode tables (`--tune_decode`), else dense attention. A line
  on stderr says which (with the decode tables' mean decode sparsity, as measured when they were tuned,
  and the decode sparsity measured on this generation).
  The tokenizer's EOS, if any, stops generation. Nothing is written.
  """
  options = config.generate
  if not options.prompt:
    raise UserInputError("--prompt is empty; give the text to continue")
  generation.check_arguments(options.max_new_tokens, temperature=options.temperature, top_p=options.top_p)
  model, tokenizer = load_model(config)
  model, prefill, decode_policy, decode = _tuned_model(model, config)
  add_bos = bool(config.eval.get("add_bos", False)) and tokenizer.bos_id is not None
  prompt = [tokenizer.bos_id] * add_bos + list(tokenizer.encode(options.prompt))
  stop = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
  # With a decode policy, also measure its decode sparsity (a second compilation of the decode loop,
  # nothing for a one-off run); dense decode reads every block.
  result = model_lib.generate(model, [prompt], options.max_new_tokens, temperature=options.temperature,
                              top_p=options.top_p, stop_tokens=stop, seed=int(config.tune.seed),
                              decode_policy=decode_policy, return_stats=decode_policy is not None)
  (new,), stats = result if decode_policy is not None else (result, None)
  text = tokenizer.decode(new[:-1] if new and new[-1] in stop else new)
  print(text)
  measured = "" if stats is None else (f"; measured decode sparsity {stats.decode_sparsity:.3f} over "
                                       f"{stats.decode_steps} decode steps")
  print(f"prefill: {prefill}; decode: {decode}; {len(new)} new tokens{measured}", file=sys.stderr)
  return {"prompt": options.prompt, "continuation": text, "new_tokens": new, "prefill": prefill,
          "decode": decode, "decode_sparsity": 0.0 if stats is None else stats.decode_sparsity}


def _tuned_model(model: Any, config: Any) -> tuple[Any, str, Any, str]:
  """(the model to generate with, a description of its prefill attention, the decode policy or None, a
  description of the decode attention) for --mode=generate."""
  checkpoint_dir = os.path.join(os.path.abspath(config.output_dir), "checkpoint")
  if not checkpoint.has_checkpoint(checkpoint_dir):
    return model, "dense", None, "dense"
  tuned = checkpoint.load_tuned(checkpoint_dir)
  tuned.check_compatible(model.config, weights_hash=checkpoint.weights_fingerprint(model))
  policy = checkpoint.attention_policy(tuned, backend=config.backend)
  prefill = f"{tuned.method_name} from {checkpoint_dir} ({tuned.layers_done} of {tuned.num_layers} layers tuned)"
  decode_tuned = tuned.decode
  if decode_tuned is None:
    return model.with_attention(policy), prefill, None, "dense"
  done = max(decode_tuned.layers_done, 1)
  decode = (f"tuned tau from {checkpoint.decode_checkpoint_dir(checkpoint_dir)} ({decode_tuned.layers_done} of "
            f"{decode_tuned.num_layers} layers tuned, decode sparsity {decode_tuned.sparsity[:done].mean():.3f} "
            "at tuning)")
  return (model.with_attention(policy), prefill, checkpoint.decode_policy(tuned, backend=config.backend),
          decode)


def tune(model: Any, tokenizer: Any, train_text: str, config: Any, *, checkpoint_dir: str,
         tuner: str | None = None) -> Any:
  """Cuts calibration + validation inputs from `train_text` and tunes every layer (resumable) with `tuner`
  (default: config.tuner)."""
  tokens = calibration.calibration_tokens(tokenizer, train_text, num_inputs=1 + config.tune.num_validation,
                                          length=config.tune.high_len)
  try:
    return model_tuning.tune_model(model, tokens, config, checkpoint_dir=checkpoint_dir,
                                   progress=config.get("progress", True), tuner=tuner or config.tuner,
                                   backend=config.backend)
  except KeyboardInterrupt:
    # What is on disk is what a rerun resumes from, whatever the loop was doing when Ctrl-C came.
    saved = checkpoint.load_tuned(checkpoint_dir).layers_done if checkpoint.has_checkpoint(checkpoint_dir) else 0
    raise Interrupted(f"{saved} of {model.config.num_layers} layers saved in {checkpoint_dir}; rerun the same "
                      "command to resume") from None


def tune_decode(model: Any, tokenizer: Any, train_text: str, config: Any, *, checkpoint_dir: str) -> Any:
  """AFBS-BO on the decode phase: per-head τ_decode (`afbs_jax.attention.decode.DecodeMethod`), scored on
  the attention outputs of the last `tune.decode_steps` positions of the same calibration and held-out
  validation inputs as the prefill, in the same band; resumable like `tune`. AFBS-BO whatever
  config.tuner is (the grid baselines tune prefill methods)."""
  decode_config = config.copy_and_resolve_references()
  decode_config.tune.method = "decode"
  return tune(model, tokenizer, train_text, decode_config, checkpoint_dir=checkpoint_dir, tuner="afbs")


def _start_output_dir(output_dir: str, config: Any) -> None:
  """Creates `output_dir` and writes the resolved config there, or says why the directory cannot be used."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise InputFileError(f"output directory {output_dir!r} is a file; name a directory")
  try:
    os.makedirs(output_dir, exist_ok=True)
    report.write_json(os.path.join(output_dir, report.CONFIG_FILE), config)
  except OSError as e:
    raise InputFileError(f"output directory {output_dir!r} cannot be written ({e.strerror}: "
                         f"{e.filename or output_dir})") from None


def _tune_results(tuned_result: Any, config: Any) -> dict[str, Any]:
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
  """Dense vs sparse (the tuned method's policy) perplexity on held-out `text`, up to max_eval_tokens.

  With `tuned=None` only the dense perplexity is measured (`--mode=dense`).
  """
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
    # The method, options and blocks the parameters were tuned with: evaluation runs what was validated.
    sparse_model = model.with_attention(checkpoint.attention_policy(tuned, backend=config.backend))
    sparse = eval_lib.perplexity_with_stats(sparse_model, tokens, **options)
    results |= {"sparse_ppl": sparse.ppl, "sparse_tokens_per_s": sparse.tokens_per_second}
  return results | {"wall_time_s": time.perf_counter() - start}
