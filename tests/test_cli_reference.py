"""README.md's CLI reference is generated from afbs_jax/main.py's absl flags and must be up to date."""

from __future__ import annotations

import importlib.util
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location("cli_reference", os.path.join(_REPO, "scripts", "cli_reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_readme_cli_reference_is_regenerated():
  script = _script()
  assert script.current() == script.render(), (
      "README.md's CLI reference is out of date: run `python scripts/cli_reference.py`")


def test_cli_reference_lists_every_main_flag():
  from absl import flags  # pylint: disable=g-import-not-at-top
  script = _script()
  table = script.render()
  for flag in flags.FLAGS.flags_by_module_dict()["afbs_jax.main"]:
    assert f"--{flag.name}`" in table or f"--[no]{flag.name}`" in table, flag.name
  assert "| `--backend` | `auto` \\| " in table
