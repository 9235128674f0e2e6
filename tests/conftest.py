"""Suite-wide collection order: the slowest files first.

The README runs the suite on every core with whole files per worker (`-n auto --dist loadfile`); a slow
file collected last would leave one worker running it alone at the end. Sorting is stable, so tests keep
their order inside a file, and a serial run is unaffected apart from the order of files.
"""

from __future__ import annotations

# Files (or folders) that each take tens of seconds on a 2-core CPU, roughly slowest first.
_SLOW_FIRST = (
    "tests/model/test_smollm2.py",
    "tests/experiments/",
    "tests/test_notebooks_execute.py",
    "tests/test_main.py",
    "tests/kernels/test_block_sparse_mosaic_gpu.py",
    "tests/model/test_precision_policy.py",
    "tests/test_layers.py",
)


def _rank(nodeid: str) -> int:
  return next((i for i, prefix in enumerate(_SLOW_FIRST) if nodeid.startswith(prefix)), len(_SLOW_FIRST))


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  items.sort(key=lambda item: _rank(item.nodeid))
