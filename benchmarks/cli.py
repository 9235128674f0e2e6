"""Command-line plumbing shared by the benchmarks.

Each benchmark defines its flags on its own `absl.flags.FlagValues` (`module_flags()`), not on the global
`FLAGS`: benchmarks reuse natural names (`--seq_lens`, `--backend`, `--out`), and the test suite imports
several of them into one process, where global definitions would collide. `run` joins them to the global
flags only when the benchmark is the program being run, so `--help` lists them and absl parses them.
"""

from __future__ import annotations

import sys
from typing import Callable

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
