"""Tests of the `python -m afbs_jax.main` entry point: flag validation and an end-to-end tiny run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from afbs_jax import main as main_lib
from afbs_jax import pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny random model on a small text: 2 layers, 4 heads, block 16, 128/256-token fidelities.
_TINY_FLAGS = ["--model=tiny", "--low_len=64", "--high_len=128", "--block_size=16", "--num_validation=2",
               "--eval_context=64", "--max_eval_tokens=256", "--noprogress"]


def _run_main(*flags: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_REPO)
  return subprocess.run([sys.executable, "-m", "afbs_jax.main", *flags], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _values(**overrides):
  return {"model": "tiny"} | overrides


@pytest.mark.parametrize("overrides, match", [
    ({"eps_low": "0.06", "eps_high": "0.05"}, "eps_low"),
    ({"model": "gpt2"}, "--model must be one of"),
    ({"low_len": "300", "high_len": "200"}, "--low_len"),
    ({"high_len": "4096"}, "exceeds tiny's context of 512"),
    ({"eval_context": "1024"}, "exceeds tiny's context"),
    ({"block_size": "48"}, "power of two"),
    ({"block_size": "8"}, "power of two >= 16"),  # the kernels' rule, not a looser CLI one
    ({"block_q": "24"}, "block_q must be a power of two"),
    ({"backend": "cuda"}, "--backend must be one of"),
    ({"method": "nope"}, "--method must be one of"),
    ({"block_size": "ten"}, "must be an integer"),
    ({"mode": "train"}, "--mode must be one of"),
    ({"tuner": "random"}, "--tuner must be one of"),
    ({"dataset": "text:/nonexistent/corpus.txt"}, "existing file"),
    ({"dataset": "c4"}, "--dataset must be"),
    ({"model": "llama2"}, "--model_path is required"),
    ({"model": "llama2", "model_path": "/nonexistent/llama"}, "does not exist"),
])
def test_bad_values_raise_flag_error(overrides, match):
  with pytest.raises(main_lib.FlagError, match=match):
    main_lib.resolve_config(_values(**overrides))


def test_flags_override_config():
  config = main_lib.resolve_config(_values(eps_low="0.01", eps_high="0.02", low_len="32", high_len="64",
                                           block_size="32", eval_context="96", max_eval_tokens="500"))
  assert (config.tune.eps_low, config.tune.eps_high) == (0.01, 0.02)
  assert (config.tune.low_len, config.tune.high_len, config.tune.block_q, config.tune.block_k) == (32, 64, 32, 32)
  assert (config.eval.context, config.eval.max_eval_tokens) == (96, 500)
  assert config.output_dir == os.path.join("outputs", "tiny")
  assert (config.mode, config.tuner) == ("all", "afbs")


def test_block_q_and_block_k_override_block_size():
  config = main_lib.resolve_config(_values(block_size="32", block_k="64"))
  assert (config.tune.block_q, config.tune.block_k) == (32, 64)


@pytest.mark.parametrize("flags, match", [
    (["--model=tiny", "--eps_low=0.2", "--eps_high=0.1"], "eps_low"),
    (["--model=nope"], "model"),
    (["--model=tiny", "--block_size=12"], "power of two"),
])
def test_bad_flags_exit_2_with_one_line(flags, match):
  completed = _run_main(*flags, timeout=60)
  assert completed.returncode == 2, completed.stderr
  lines = [line for line in completed.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, completed.stderr
  assert lines[0].startswith("error: ") and match in lines[0]
  assert "Traceback" not in completed.stderr


def test_eval_without_checkpoint_exits_2(tmp_path):
  completed = _run_main("--model=tiny", "--mode=eval", f"--output_dir={tmp_path}", "--noprogress", timeout=120)
  assert completed.returncode == 2, completed.stderr[-2000:]
  lines = [line for line in completed.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: checkpoint directory"), completed.stderr


@pytest.mark.slow
def test_tiny_end_to_end_and_resume(tmp_path):
  text = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["state", "union", "people", "nation", "congress", "law", "year", "work", "peace", "world"]
  text.write_text(" ".join(rng.choice(words, size=12000)))
  output_dir = tmp_path / "out"
  flags = [*_TINY_FLAGS, f"--dataset=text:{text}", f"--output_dir={output_dir}"]
  completed = _run_main(*flags)
  assert completed.returncode == 0, completed.stderr[-3000:]
  for name in ("results.json", "config.json", "sparsity_heatmap.png"):
    assert (output_dir / name).is_file(), name
  results = json.loads((output_dir / "results.json").read_text())
  for name in ("tau", "theta", "lam", "s", "error", "sparsity"):
    assert np.asarray(results["tuned"][name]).shape == (2, 4), name
  assert len(results["tune"]["layers"]) == 2
  assert results["tune"]["layers_done"] == 2
  assert results["eval"]["dense_ppl"] > 1.0 and results["eval"]["sparse_ppl"] > 1.0
  worst = np.max(results["tuned"]["error"])
  assert worst <= results["tune"]["band"][1] + 1e-6
  config = json.loads((output_dir / "config.json").read_text())
  assert config["tune"]["high_len"] == 128 and config["model"]["num_heads"] == 4
  # In-process from here on. A rerun finds the finished checkpoint: nothing is retuned.
  values = {"model": "tiny", "low_len": "64", "high_len": "128", "block_size": "16", "num_validation": "2",
            "eval_context": "64", "max_eval_tokens": "256", "dataset": f"text:{text}",
            "output_dir": str(output_dir)}
  config = main_lib.resolve_config(values | {"mode": "tune"})
  config.progress = False
  rerun = pipeline.run(config)
  assert rerun["tune"]["layers_resumed"] == 2 and "eval" not in rerun
  np.testing.assert_array_equal(rerun["tuned"]["s"], np.asarray(results["tuned"]["s"], np.float32))
  # --mode=eval evaluates the saved parameters without tuning.
  config = main_lib.resolve_config(values | {"mode": "eval"})
  config.progress = False
  evaluated = pipeline.run(config)
  assert "tune" not in evaluated
  np.testing.assert_allclose(evaluated["eval"]["dense_ppl"], results["eval"]["dense_ppl"], rtol=1e-5)
  np.testing.assert_allclose(evaluated["eval"]["sparse_ppl"], results["eval"]["sparse_ppl"], rtol=1e-5)
  # --mode=dense measures the dense perplexity only, with no checkpoint involved.
  config = main_lib.resolve_config(values | {"mode": "dense", "output_dir": str(tmp_path / "dense")})
  config.progress = False
  dense_only = pipeline.run(config)
  assert "tune" not in dense_only and "sparse_ppl" not in dense_only["eval"]
  assert not (tmp_path / "dense" / "checkpoint").exists()
  np.testing.assert_allclose(dense_only["eval"]["dense_ppl"], results["eval"]["dense_ppl"], rtol=1e-5)


def test_cli_choices_come_from_the_registries():
  import configs  # pylint: disable=g-import-not-at-top
  from afbs_jax.tuner import registry  # pylint: disable=g-import-not-at-top
  assert main_lib.TUNERS == tuple(registry.TUNERS)
  assert main_lib.MODELS == tuple(configs.CONFIG_MODULES)
