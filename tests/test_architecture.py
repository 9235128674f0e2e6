"""The import structure: four floors, no import reaching back up, no cycles between packages.

Every import is read from the source (module level and inside functions alike), so a lazy import that
reaches up a floor fails here just as a top-level one would.
"""

from __future__ import annotations

import ast
import collections
import os

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOTS = ("afbs_jax", "kernels", "configs")

# Floor of each unit (a top-level package, or a first-level module or package of afbs_jax).
FLOORS = {
    # 0: the kernels: Pallas and jnp, no knowledge of models or tuning.
    "kernels": 0,
    # 1: attention methods and the policy seam, baselines, the model, its data.
    "afbs_jax.attention": 1, "afbs_jax.baselines": 1, "afbs_jax.model": 1, "afbs_jax.data": 1,
    "afbs_jax.calibration": 1, "afbs_jax.errors": 1,
    # 2: measuring and tuning what floor 1 computes, and storing the result.
    "afbs_jax.tuner": 2, "afbs_jax.eval": 2, "afbs_jax.checkpoint": 2,
    # The one-layer module for users' own models: it deploys what checkpoint.py stores.
    "afbs_jax.layers": 2,
    # 3: configs, the pipeline, reports and the command line.
    "configs": 3, "afbs_jax.pipeline": 3, "afbs_jax.report": 3, "afbs_jax.main": 3, "afbs_jax": 3,
}
# Inside floor 1 the model calls attention policies; a policy never knows the model.
_FORBIDDEN = {("afbs_jax.attention", "afbs_jax.model"), ("afbs_jax.baselines", "afbs_jax.model")}


def _modules() -> dict[str, str]:
  found = {}
  for root in _ROOTS:
    for directory, _, files in os.walk(os.path.join(_REPO, root)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(directory, name)
          module = os.path.relpath(path, _REPO)[:-3].replace(os.sep, ".")
          found[module.removesuffix(".__init__")] = path
  return found


def _unit(module: str) -> str:
  parts = module.split(".")
  return ".".join(parts[:2]) if parts[0] == "afbs_jax" and len(parts) > 1 else parts[0]


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """Project modules imported anywhere in the file (`from pkg import mod` resolves to pkg.mod)."""
  targets = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
               for alias in node.names]
    else:
      continue
    targets.update(name for name in names if name.split(".")[0] in _ROOTS)
  return targets


def _unit_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = collections.defaultdict(set)
  for module, path in modules.items():
    for target in _imports(path, modules):
      if _unit(target) != _unit(module):
        graph[_unit(module)].add(_unit(target))
  return graph


def test_every_unit_has_a_floor():
  units = {_unit(module) for module in _modules()}
  assert units - set(FLOORS) == set(), "place each new package or module on a floor in FLOORS"


def test_no_import_reaches_up_a_floor():
  upward = sorted((source, target) for source, targets in _unit_graph().items() for target in targets
                  if FLOORS[target] > FLOORS[source] or (source, target) in _FORBIDDEN)
  assert upward == []


def test_units_form_no_cycle():
  graph = _unit_graph()
  state: dict[str, str] = {}

  def visit(unit: str, path: tuple[str, ...]) -> None:
    if state.get(unit) == "done":
      return
    if state.get(unit) == "open":
      pytest.fail(f"import cycle: {' -> '.join(path + (unit,))}")
    state[unit] = "open"
    for target in sorted(graph.get(unit, ())):
      visit(target, path + (unit,))
    state[unit] = "done"

  for unit in sorted(graph):
    visit(unit, ())


def test_the_generic_front_door_never_imports_sparge():
  """A mask baseline or a new backend goes through kernels.block_sparse without touching SpargeAttn."""
  modules = _modules()
  generic = ("kernels.block_sparse", "kernels.block_config", "kernels.block_index",
             "kernels.block_sparse_reference", "afbs_jax.attention.method", "afbs_jax.attention.block_mask")
  for module in generic:
    assert not any("sparge" in target for target in _imports(modules[module], modules)), module
