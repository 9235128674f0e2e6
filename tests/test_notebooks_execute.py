"""Runs every Colab notebook top to bottom on CPU with tiny parameters, so that none can rot.

Each notebook's first code cell installs the package only on Colab (`"google.colab" in sys.modules`), and
its cell tagged `parameters` is followed, as papermill does, by an injected cell that overrides the
parameters with `CI_PARAMETERS` (the tiny random model, a few hundred tokens, the bundled corpus). The
notebooks run in a fresh Jupyter kernel (nbclient + ipykernel, from the `test` extra) whose working
directory is a temporary folder; together they take about a minute on a 2-core CPU.
"""

from __future__ import annotations

import ast
import glob
import os

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOKS = sorted(glob.glob(os.path.join(_REPO, "colab", "*.ipynb")))
_TINY_RUN = dict(MODEL="tiny", LOW_LEN=64, HIGH_LEN=128, NUM_VALIDATION=1, EVAL_CONTEXT=128,
                 MAX_EVAL_TOKENS=256, COMPARE_TOKENS=128)
CI_PARAMETERS = {
    "quickstart.ipynb": dict(_TINY_RUN, OUTPUT_DIR="outputs/quickstart"),
    "kernel_benchmark.ipynb": dict(SEQ_LENS=[256], DENSITIES=[1.0, 0.5, 0.25], HEADS=2, KV_HEADS=1,
                                   HEAD_DIM=32, BLOCK=32, REPS=2),
    "llama2.ipynb": dict(_TINY_RUN, DATASET="sotu", OUTPUT_DIR="outputs/llama2", SAVED_CHECKPOINT="saved"),
    # 480 bytes: the tiny model's 512 positions hold the prompt and a 16-token answer.
    "generation.ipynb": dict(MODEL="tiny", LOW_LEN=64, HIGH_LEN=128, NUM_VALIDATION=1, OUTPUT_DIR="outputs/generation",
                             MAX_NEW_TOKENS=8, TASK_LENGTH=480, NUM_SAMPLES=2, BATCH_SIZE=2),
}
_CELL_TIMEOUT_S = 300


def _read(path: str):
  import nbformat  # pylint: disable=g-import-not-at-top  (the `test` extra)
  return nbformat.read(path, as_version=4)


def _parameters_cell(notebook) -> int:
  tagged = [index for index, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
  return tagged[0]


def _assigned_names(source: str) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Assign):
      for target in node.targets:
        names |= {name.id for name in ast.walk(target) if isinstance(name, ast.Name)}
  return names


def test_every_notebook_has_ci_parameters():
  assert {os.path.basename(path) for path in _NOTEBOOKS} == set(CI_PARAMETERS)


@pytest.mark.parametrize("path", _NOTEBOOKS, ids=os.path.basename)
def test_notebook_layout(path):
  """Install first (Colab only), then one papermill parameters cell that defines what CI overrides."""
  notebook = _read(path)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert "pip install" in code[0].source and '"google.colab" in sys.modules' in code[0].source
  parameters = notebook.cells[_parameters_cell(notebook)]
  missing = set(CI_PARAMETERS[os.path.basename(path)]) - _assigned_names(parameters.source)
  assert not missing, f"the parameters cell does not define {sorted(missing)}"


def _inject(notebook, parameters: dict) -> None:
  import nbformat  # pylint: disable=g-import-not-at-top
  source = "# Parameters (injected by tests/test_notebooks_execute.py)\n" + "\n".join(
      f"{name} = {value!r}" for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  notebook.cells.insert(_parameters_cell(notebook) + 1, cell)


@pytest.mark.slow
@pytest.mark.parametrize("path", _NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_on_cpu(path, tmp_path, monkeypatch):
  import nbclient  # pylint: disable=g-import-not-at-top  (the `test` extra, with nbformat and ipykernel)
  notebook = _read(path)
  _inject(notebook, CI_PARAMETERS[os.path.basename(path)])
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = nbclient.NotebookClient(notebook, timeout=_CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()   # raises CellExecutionError with the failing cell's traceback
