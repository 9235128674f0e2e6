"""Writes README.md's CLI reference: a table generated from the absl flags that afbs_jax/main.py defines.

    python scripts/cli_reference.py            # rewrite the block between the cli_reference markers
    python scripts/cli_reference.py --check    # exit 1 if the block is out of date (tests/test_cli_reference.py)

Nothing is hand-written between the markers: a flag's name, default, choices and help string come from its
`flags.DEFINE_*` call, so adding a flag to main.py and rerunning this script is the whole update.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(_REPO, "README.md")
BEGIN = "<!-- begin cli_reference -->"
END = "<!-- end cli_reference -->"
_MODULE = "afbs_jax.main"


def _cell(text: str) -> str:
  return " ".join(str(text).split()).replace("|", "\\|")


def _help(flag) -> str:
  # absl prefixes an enum's help with its choices ("<a|b>: "); the values column already lists them.
  return _cell(re.sub(r"^<[^>]*>: ", "", flag.help))


def _values(flag) -> str:
  choices = getattr(flag.parser, "enum_values", None)
  if choices:
    return " \\| ".join(f"`{choice}`" for choice in choices)
  return {"bool": "true \\| false", "int": "int", "float": "float"}.get(flag.flag_type(), "string")


def _default(flag) -> str:
  if flag.default is None:
    return "—"
  if flag.boolean:
    return "true" if flag.default else "false"
  return f"`{flag.default}`"


def render() -> str:
  """The Markdown table of afbs_jax.main's flags, in their definition order."""
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
  from absl import flags  # pylint: disable=g-import-not-at-top
  import afbs_jax.main  # pylint: disable=g-import-not-at-top,unused-import  (registers the flags)
  rows = ["| flag | values | default | what it sets |", "|---|---|---|---|"]
  for flag in flags.FLAGS.flags_by_module_dict()[_MODULE]:
    name = f"`--[no]{flag.name}`" if flag.boolean else f"`--{flag.name}`"
    rows.append(f"| {name} | {_values(flag)} | {_default(flag)} | {_help(flag)} |")
  return "\n".join(rows)


def _block(text: str) -> tuple[int, int]:
  start, end = text.find(BEGIN), text.find(END)
  if start < 0 or end < start:
    raise SystemExit(f"{README} lacks the markers {BEGIN} ... {END}")
  return start + len(BEGIN), end


def current() -> str:
  """The table now in README.md, between the markers."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  start, end = _block(text)
  return text[start:end].strip("\n")


def write() -> bool:
  """Rewrites the README block; returns whether it changed."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  start, end = _block(text)
  updated = text[:start] + "\n" + render() + "\n" + text[end:]
  if updated != text:
    with open(README, "w", encoding="utf-8") as f:
      f.write(updated)
  return updated != text


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if README.md's block is out of date")
  args = parser.parse_args()
  if args.check:
    stale = current() != render()
    print("README.md's CLI reference is out of date: run python scripts/cli_reference.py" if stale else
          "README.md's CLI reference is up to date")
    return int(stale)
  print("README.md's CLI reference updated" if write() else "README.md's CLI reference was up to date")
  return 0


if __name__ == "__main__":
  sys.exit(main())
