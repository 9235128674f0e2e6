"""`python -m afbs_jax.main --mode=generate`: prints the continuation, prefills with a tuned checkpoint's
sparse policy when --output_dir holds one, and reports user errors on one line with exit status 2.

Most cases run `afbs_jax.main.run_command` in-process on the tiny random model (one JAX import); one runs
the real command line to check that the flags reach the run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import configs
from afbs_jax import checkpoint, pipeline
from afbs_jax import main as main_lib
from afbs_jax.attention import SpargeAttention
from afbs_jax.calibration import ByteTokenizer
from afbs_jax.model import generate, init_random

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROMPT = "Four score and seven years ago our fa"  # 37 bytes: tests/model/test_generate.py's shapes


def _run(capsys, tmp_path, **values) -> tuple[int, str, list[str]]:
  """(exit status, stdout, non-blank stderr lines) of the CLI in --mode=generate on the tiny model."""
  values = {"model": "tiny", "mode": "generate", "output_dir": str(tmp_path / "out")} | values
  status = main_lib.run_command(values, progress=False)
  captured = capsys.readouterr()
  return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_prints_the_greedy_continuation(capsys, tmp_path):
  status, out, err = _run(capsys, tmp_path, prompt=_PROMPT, max_new_tokens="10")
  assert status == 0, err
  model = init_random(configs.get_config("tiny").model, seed=0)
  expected = ByteTokenizer().decode(generate(model, [list(_PROMPT.encode())], 10)[0])
  assert out == expected + "\n"
  assert err == ["prefill: dense; decode: dense; 10 new tokens"]
  assert not os.path.exists(tmp_path / "out")  # generation writes nothing


def test_a_tuned_checkpoint_in_output_dir_prefills_sparsely(capsys, tmp_path, monkeypatch):
  tuned = checkpoint.empty_tuned(2, 4, {"tau": 0.3, "theta": -1.0, "lam": -30.0},
                                 {"model_name": "tiny", "blocks": {"block_q": 16, "block_k": 16, "causal": True}})
  tuned.metadata["layers_done"] = 2
  checkpoint.save_tuned(tmp_path / "out" / "checkpoint", tuned)
  used = []
  monkeypatch.setattr(pipeline.model_lib, "generate", lambda model, *args, **kwargs: used.append(model) or [[65]])
  status, out, err = _run(capsys, tmp_path, prompt=_PROMPT)
  assert (status, out) == (0, "A\n"), err
  policy = used[0].attention
  assert isinstance(policy, SpargeAttention) and (policy.block_q, policy.block_k) == (16, 16)
  np.testing.assert_array_equal(np.asarray(policy.tau), tuned.tau)
  assert err[0].startswith("prefill: sparge from ") and "(2 of 2 layers tuned); decode: dense" in err[0]


@pytest.mark.parametrize("values, fragment", [
    ({"prompt": ""}, "--prompt is empty"),
    ({"prompt": "hi", "max_new_tokens": "0"}, "max_new_tokens must be an integer >= 1; got 0"),
    ({"prompt": "x" * 500, "max_new_tokens": "13"}, "500 tokens plus max_new_tokens=13 exceeds tiny's context of 512"),
    ({"prompt": "hi", "temperature": "-1"}, "temperature must be >= 0"),
    ({"prompt": "hi", "top_p": "1.5"}, "top_p must lie in (0, 1]"),
    ({"prompt": "hi", "max_new_tokens": "many"}, "--max_new_tokens must be an integer"),
])
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, values, fragment):
  status, out, err = _run(capsys, tmp_path, **values)
  assert (status, out, len(err)) == (2, "", 1), err
  assert err[0].startswith("error: ") and fragment in err[0], err[0]


def test_checkpoint_of_another_model_exits_2(capsys, tmp_path):
  tuned = checkpoint.empty_tuned(2, 4, {"tau": 1.0, "theta": 0.2, "lam": -30.0},
                                 {"model_name": "llama2", "blocks": {"block_q": 16, "block_k": 16, "causal": True}})
  checkpoint.save_tuned(tmp_path / "out" / "checkpoint", tuned)
  status, out, err = _run(capsys, tmp_path, prompt=_PROMPT)
  assert (status, out, len(err)) == (2, "", 1) and "belong to model 'llama2', not 'tiny'" in err[0], err


def test_command_line_flags_reach_the_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_REPO)
  completed = subprocess.run(
      [sys.executable, "-m", "afbs_jax.main", "--model=tiny", "--mode=generate", "--prompt=",
       "--max_new_tokens=4", f"--output_dir={tmp_path}"], cwd=_REPO, env=env, capture_output=True, text=True,
      timeout=120, check=False)
  assert completed.returncode == 2 and completed.stderr.strip() == "error: --prompt is empty; give the text to continue"
