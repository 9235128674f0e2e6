"""Command-line plumbing shared by the benchmarks.

Each benchmark defines its flags on its own `absl.flags.FlagValues` (`module_flags()`), not on the global
`FLAGS`: benchmarks reuse natural names (`--seq_lens`, `--backend`, `--out`), and the test suite imports
several of them into one process, where global definitions would collide. `run` joins them to the global
flags only when the benchmark is the program being run, so `--help` lists them and absl parses them.
Results files are written atomically (`write_results`).
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import sys
from typing import Any, Callable

from absl import app
from absl import flags


def module_flags() -> flags.FlagValues:
  """A fresh FlagValues for one benchmark's `flags.DEFINE_*(..., flag_values=...)` calls."""
  return flags.FlagValues()


def run(main: Callable[[list[str]], None], own: flags.FlagValues) -> None:
  """`app.run(main)` with `own` flags parsed from the command line and listed by --help."""
  flags.FLAGS.append_flag_values(own)
  for name in own:
    flags.FLAGS.register_flag_by_module(sys.argv[0], own[name])

  def main_with_own_flags(argv: list[str]) -> None:
    own.mark_as_parsed()  # the global parse has set their values: the flag objects are shared
    main(argv)

  app.run(main_with_own_flags)


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename: a run stopped mid-write (benchmarks
  run under time limits, and several resume from their own JSON) leaves the previous file whole."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  temporary = f"{path}.tmp"
  with open(temporary, "w", encoding="utf-8") as file:
    file.write(text)
  os.replace(temporary, path)


def write_results(results: Mapping[str, Any], json_path: str, markdown: Callable[[Any], str]) -> str:
  """Writes `results` as JSON (NaN kept: failed timings are NaN) and `markdown(results)` beside it as .md,
  each atomically; both texts are made before either file is touched. Returns the .md path."""
  markdown_path = os.path.splitext(json_path)[0] + ".md"
  json_text, markdown_text = json.dumps(results, indent=1, default=str), markdown(results)
  write_atomically(json_path, json_text)
  write_atomically(markdown_path, markdown_text)
  return markdown_path
