"""Static checks of the Colab notebooks and the docs that quote commands and module names.

The notebooks (`colab/*.ipynb`) must be valid nbformat 4 with no stored outputs. Every command that
they, `README.md`, `WORKSPACE.md` or `colab/README.md` run (`python -m afbs_jax.main ...`,
`python -m benchmarks.<name> ...`, `python -m experiments.<name> ...` or `python scripts/<name>.py ...`)
may pass only flags that its target defines, and `afbs_jax.main`'s flag values must parse. Benchmarks
and experiments are packages run as modules from the repository root, so quoting one as a file
(`python benchmarks/x.py`) is an error. The modules, public names and paths that `WORKSPACE.md` cites
must exist. Nothing is executed: flags are read from the targets' absl `DEFINE_*` / argparse
`add_argument` calls.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

from absl import flags
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOKS = sorted(glob.glob(os.path.join(_REPO, "colab", "*.ipynb")))
_DOCS = ("README.md", "WORKSPACE.md", os.path.join("colab", "README.md"))
# Packages whose programs run as `python -m <package>.<name>` (scripts/ holds files run by path).
_MODULE_PACKAGES = ("benchmarks", "experiments")

_ABSL_DEFINE = re.compile(r"flags\.DEFINE_(\w+)\(\s*[\"'](\w+)[\"']")
_ARGPARSE_ARG = re.compile(r"add_argument\(\s*[\"']--([\w-]+)[\"']")
# A command: `-m afbs_jax.main`, `-m benchmarks.x` / `-m experiments.x`, or a script path, followed by its
# arguments up to the end of the line.
_COMMAND = re.compile(r"(?:-m\s+(?P<module>afbs_jax\.main|(?:benchmarks|experiments)\.\w+)\b"
                      r"|(?P<script>\b(?:benchmarks|experiments|scripts)/\w+\.py))(?P<args>[^\n]*)")
# A benchmark or experiment run by path: that puts its folder, not the repository root, on sys.path.
_RUN_AS_FILE = re.compile(r"\bpython[\w.]*\s+(?P<path>(?:benchmarks|experiments)/\w+\.py)")
# --name, --name=value or --name value (a spaced value never starts with "-": that is the next flag).
_FLAG = re.compile(r"(?<![\w-])--(?P<name>[A-Za-z_][\w-]*)"
                   r"(?:=(?P<value>[^\s\]`]+)|\s(?P<spaced>[^\s\]`-][^\s\]`]*))?")
# Flags absl defines for every program.
_ABSL_BUILTINS = frozenset({"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok"})
_NBFORMAT_CELL_KEYS = {"markdown": {"cell_type", "metadata", "source"},
                       "raw": {"cell_type", "metadata", "source"},
                       "code": {"cell_type", "metadata", "source", "outputs", "execution_count"}}


@dataclasses.dataclass(frozen=True)
class Command:
  target: str              # the file that runs ("afbs_jax/main.py", "benchmarks/x.py"), relative to the root
  flags: tuple[tuple[str, str | None], ...]   # (name, value or None)
  line: str


def module_path(module: str) -> str:
  """`benchmarks.kernel_bench` -> `benchmarks/kernel_bench.py` (the file `python -m` runs)."""
  return module.replace(".", "/") + ".py"


def find_commands(text: str) -> list[Command]:
  """Every afbs_jax.main / benchmark / experiment / script invocation in `text`, with its --flags."""
  commands = []
  for match in _COMMAND.finditer(text.replace("\\\n", " ")):
    target = module_path(match["module"]) if match["module"] else match["script"]
    found = tuple((flag["name"], flag["value"] or flag["spaced"]) for flag in _FLAG.finditer(match["args"]))
    commands.append(Command(target, found, match.group(0).strip()))
  return commands


# `from experiments import common`: a sibling module whose absl flags the target's program also has.
_SIBLING_IMPORT = re.compile(r"^from (benchmarks|experiments) import (\w+)", re.M)


def defined_flags(target: str) -> tuple[set[str], set[str]]:
  """(every flag name, the boolean ones) that `target`'s source defines (absl or argparse), including the
  absl flags of the benchmark/experiment modules it imports (shared harness flags such as --quick)."""
  with open(os.path.join(_REPO, target), encoding="utf-8") as f:
    source = f.read()
  names, booleans = set(), set()
  for package, module in _SIBLING_IMPORT.findall(source):
    sibling = f"{package}/{module}.py"
    if sibling != target and os.path.isfile(os.path.join(_REPO, sibling)):
      sibling_names, sibling_booleans = defined_flags(sibling)
      names |= sibling_names
      booleans |= sibling_booleans
  for kind, name in _ABSL_DEFINE.findall(source):
    names.add(name)
    if kind in ("bool", "boolean"):
      booleans.add(name)
  for name in _ARGPARSE_ARG.findall(source):
    names.add(name)
  return names, booleans


def run_as_file(text: str) -> list[str]:
  """Benchmark / experiment paths that `text` runs as files (`python benchmarks/x.py`), not as modules."""
  return [match["path"] for match in _RUN_AS_FILE.finditer(text)]


def unknown_flags(command: Command) -> list[str]:
  """The flags of `command` that its target does not define (absl's --noNAME negates a boolean)."""
  names, booleans = defined_flags(command.target)
  unknown = []
  for name, _ in command.flags:
    if name in names or name in _ABSL_BUILTINS:
      continue
    if name.startswith("no") and name[2:] in booleans:
      continue
    unknown.append(name)
  return unknown


def bad_main_values(command: Command) -> list[str]:
  """`afbs_jax.main` flag values that the flag's own absl parser rejects (enum choices, numbers)."""
  # Importing the entry point registers its flags with absl; nothing is parsed or run.
  from afbs_jax import main as main_lib  # pylint: disable=g-import-not-at-top,unused-import
  bad = []
  for name, value in command.flags:
    if value is None or "{" in value or name in _ABSL_BUILTINS or name not in flags.FLAGS:
      continue  # No value, or an IPython {variable} filled in at run time.
    try:
      flags.FLAGS[name].parser.parse(value)
    except (ValueError, flags.Error) as e:
      bad.append(f"--{name}={value}: {e}")
  return bad


def _notebook(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _code_text(notebook: dict) -> str:
  return "\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")


def _documents() -> list[tuple[str, str]]:
  """(name, text to search for commands) for every notebook and doc."""
  documents = [(os.path.relpath(path, _REPO), _code_text(_notebook(path))) for path in _NOTEBOOKS]
  for name in _DOCS:
    with open(os.path.join(_REPO, name), encoding="utf-8") as f:
      documents.append((name, f.read()))
  return documents


def test_there_are_notebooks():
  names = {os.path.basename(path) for path in _NOTEBOOKS}
  assert {"quickstart.ipynb", "kernel_benchmark.ipynb"} <= names


@pytest.mark.parametrize("path", _NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_nbformat4_without_outputs(path):
  notebook = _notebook(path)
  assert notebook.get("nbformat") == 4, f"{path}: nbformat {notebook.get('nbformat')}"
  assert isinstance(notebook.get("nbformat_minor"), int)
  assert isinstance(notebook.get("metadata"), dict)
  assert notebook["cells"], f"{path} has no cells"
  for index, cell in enumerate(notebook["cells"]):
    kind = cell.get("cell_type")
    assert kind in _NBFORMAT_CELL_KEYS, f"cell {index}: cell_type {kind!r}"
    missing = _NBFORMAT_CELL_KEYS[kind] - cell.keys()
    assert not missing, f"cell {index} lacks {sorted(missing)}"
    assert isinstance(cell["source"], (str, list))
    if kind == "code":
      assert cell["outputs"] == [], f"cell {index} has stored outputs"
      assert cell["execution_count"] is None, f"cell {index} has an execution count"
  try:
    import nbformat  # pylint: disable=g-import-not-at-top
  except ImportError:
    return  # The structural checks above stand in for the full schema.
  nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))


@pytest.mark.parametrize("path", _NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_the_library(path):
  targets = {command.target for command in find_commands(_code_text(_notebook(path)))}
  assert targets, f"{path} runs neither afbs_jax.main nor a benchmark"


@pytest.mark.parametrize("name, text", _documents(), ids=lambda value: value if value in _DOCS or
                         str(value).endswith(".ipynb") else "")
def test_commands_use_defined_flags(name, text):
  problems = []
  for command in find_commands(text):
    assert os.path.exists(os.path.join(_REPO, command.target)), f"{name}: {command.target} does not exist"
    package = command.target.split("/")[0]
    if package in _MODULE_PACKAGES:  # `python -m package.name` needs package/__init__.py
      assert os.path.exists(os.path.join(_REPO, package, "__init__.py")), f"{package}/__init__.py is missing"
    problems += [f"--{flag} (not defined by {command.target}) in: {command.line}"
                 for flag in unknown_flags(command)]
    if command.target == "afbs_jax/main.py":
      problems += [f"{problem} in: {command.line}" for problem in bad_main_values(command)]
  assert not problems, f"{name}:\n" + "\n".join(problems)


def test_flag_check_catches_mistakes():
  """The checker must fail on an undefined flag, a bad enum value and a misspelt negation."""
  (good,) = find_commands("!python -m afbs_jax.main --low_len=2048 --noprogress --output_dir={OUT}")
  assert unknown_flags(good) == [] and bad_main_values(good) == []
  (typo,) = find_commands("python -m afbs_jax.main --low-len=2048 --max_eval_token=5 --noseed")
  assert unknown_flags(typo) == ["low-len", "max_eval_token", "noseed"]
  (enum,) = find_commands("python -m afbs_jax.main --model=gpt2 --high_len=many")
  assert [problem.split(":")[0] for problem in bad_main_values(enum)] == ["--model=gpt2", "--high_len=many"]
  (module,) = find_commands("!python -m benchmarks.kernel_bench --mode=full --noflex --seqlens=4")
  assert module.target == "benchmarks/kernel_bench.py" and unknown_flags(module) == ["seqlens"]
  (experiment,) = find_commands(".venv/bin/python -m experiments.latent_frontier --noattention_sink --lenth=8")
  assert experiment.target == "experiments/latent_frontier.py" and unknown_flags(experiment) == ["lenth"]
  (script,) = find_commands("python scripts/measure_dense_ppl.py --max_tokens 16 --max_token 4")
  assert unknown_flags(script) == ["max_token"]
  assert run_as_file("PYTHONPATH=. python benchmarks/kernel_bench.py --mode=check\n"
                     ".venv/bin/python experiments/latent_frontier.py") == [
                         "benchmarks/kernel_bench.py", "experiments/latent_frontier.py"]
  assert run_as_file("python -m benchmarks.kernel_bench; python scripts/fetch_sotu.py; benchmarks/x.py") == []


@pytest.mark.parametrize("name, text", _documents(), ids=lambda value: value if value in _DOCS or
                         str(value).endswith(".ipynb") else "")
def test_benchmarks_and_experiments_run_as_modules(name, text):
  stale = run_as_file(text)
  assert not stale, (f"{name} runs {stale} as files; run them from the repository root as "
                     + ", ".join(f"python -m {path[:-3].replace('/', '.')}" for path in stale))


# ------------------------------------------------------------------------------------------------
# WORKSPACE.md: the paths and public names it cites exist.

_BACKTICKED = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"^(?:afbs_jax|kernels|configs|benchmarks|experiments|scripts|tests|colab|results)"
                   r"(?:/[\w.-]+)*/?$")
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*")


def _workspace() -> str:
  with open(os.path.join(_REPO, "WORKSPACE.md"), encoding="utf-8") as f:
    return f.read()


def test_workspace_paths_exist():
  cited = {token for token in _BACKTICKED.findall(_workspace()) if _PATH.match(token)}
  assert len(cited) > 20
  missing = sorted(path for path in cited if not os.path.exists(os.path.join(_REPO, path)))
  assert not missing, f"WORKSPACE.md cites paths that do not exist: {missing}"


def _defines(source: str, name: str) -> bool:
  return re.search(rf"^\s*(?:def|class)\s+{name}\b|^{name}\s*(?::[^=\n]*)?=", source, re.M) is not None


def test_workspace_module_tables_name_real_definitions():
  """Each module-table row `| `path.py` | job | `name`, ... |` names things defined in that file."""
  rows = re.findall(r"^\| `([\w/]+\.py)` \| [^|]+ \| ([^|\n]+) \|$", _workspace(), re.M)
  assert len(rows) > 20
  missing = []
  for path, names in rows:
    with open(os.path.join(_REPO, path), encoding="utf-8") as f:
      source = f.read()
    for token in _BACKTICKED.findall(names):
      name = _IDENTIFIER.match(token)
      if name and not _defines(source, name.group(0)):
        missing.append(f"{path}: {name.group(0)}")
  assert not missing, f"WORKSPACE.md names what its module does not define: {missing}"
