"""The errors a user can cause, typed, so that the command line reports each on one line without a traceback.

The library raises these where it finds the problem and names what is wrong (the file, the flag, the
length); `afbs_jax.main.run_command` is the one place that maps them to an exit status: a
`UserInputError` (or a kernel `BlockConfigError`, which floor 0 raises without importing this module)
prints `error: <message>` and exits 2, an `Interrupted` prints `interrupted: <message>` and exits 130.
Anything else is a bug and keeps its traceback. Subclasses that belong to one module live there:
`FlagError` (`afbs_jax/main.py`), `CheckpointError` and `CheckpointMismatchError`
(`afbs_jax/checkpoint.py`), `CorpusUnavailableError` (`afbs_jax/data/corpora.py`).
"""

from __future__ import annotations


class UserInputError(ValueError):
  """Input the user gave (a flag, a file, a checkpoint) cannot be used; the message says what and why."""


class InputFileError(UserInputError):
  """A file or directory the user named (model, corpus, output directory) is of the wrong kind, empty,
  unreadable or incomplete; the message names it."""


class ShortInputError(UserInputError):
  """The data are shorter than the lengths asked for (the tuning fidelities, a train/test split)."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during a resumable step; the message says what was saved and how to resume."""
