"""scripts/reproduce_gpu.sh on CPU: its step list names real modules and flags, and bad steps are refused."""

from __future__ import annotations

import importlib.util
import os
import subprocess

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_REPO, "scripts", "reproduce_gpu.sh")


def _steps() -> dict[str, list[str]]:
  listed = subprocess.run(["bash", _SCRIPT, "--list"], capture_output=True, text=True, check=True).stdout
  steps = {}
  for line in listed.splitlines():
    name, python, *command = line.split()
    assert python == "python", line
    steps[name] = command
  return steps


def test_every_step_runs_a_module_of_this_repository():
  steps = _steps()
  assert {"kernel_bench", "kernel_profile", "pareto", "frontier", "sfa_pretrain", "report"} <= set(steps)
  for name, command in steps.items():
    assert command[0] == "-m", name
    assert importlib.util.find_spec(command[1]) is not None, f"{name}: no module {command[1]}"


def test_every_results_file_of_a_step_is_covered():
  """Each benchmark or experiment whose JSON is committed in results/ has a step that writes it."""
  modules = {command[1].split(".")[-1] for command in _steps().values()}
  for stem in ("kernel_bench", "kernel_profile", "prefill_bench", "model_throughput", "decode_bench",
               "sfa_bench", "tuner_bench", "main_table", "pareto", "passkey", "frontier", "sfa_pretrain"):
    assert stem in modules, stem


def test_an_unknown_step_is_refused_with_the_list():
  result = subprocess.run(["bash", _SCRIPT, "no_such_step"], capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert "unknown step 'no_such_step'" in result.stderr and "pareto" in result.stderr
