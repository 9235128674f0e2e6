"""Suite-wide: the slowest files collected first, and compiled code released after every file.

The README runs the suite on every core with whole files per worker (`-n auto --dist loadfile`); a slow
file collected last would leave one worker running it alone at the end. Sorting is stable, so tests keep
their order inside a file, and a serial run is unaffected apart from the order of files.
"""

from __future__ import annotations

import os
import tempfile

import jax
import pytest

# One on-disk XLA compilation cache for the whole run: xdist workers, files after `_release_compiled_code`
# and the subprocesses some tests start (the entry point, notebooks) reuse programs another test compiled
# (the tiny model's forward at the same shapes recurs across files). Keyed by program and jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "afbs-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

# Files (or folders) that each take tens of seconds on a 2-core CPU, slowest first: per-file sums of the
# slowest tests of a full `-n 2 --dist loadfile --durations=80` run. A slow file dispatched last runs alone
# at the end (a clean CI run spent its last ~4 minutes that way before this order).
_SLOW_FIRST = (
    "tests/baselines/test_policies.py",
    "tests/model/test_smollm2.py",
    "tests/experiments/test_main_table.py",
    "tests/experiments/test_pareto.py",
    "tests/kernels/test_block_sparse_mosaic_gpu.py",
    "tests/test_notebooks_execute.py",
    "tests/model/test_generate_decode_sparse.py",
    "tests/experiments/test_frontier.py",
    "tests/experiments/test_downstream.py",
    "tests/model/test_precision_policy.py",
    "tests/baselines/test_patterns.py",
    "tests/test_layers.py",
    "tests/experiments/",
    "tests/model/test_generate.py",
    "tests/test_main.py",
    "tests/benchmarks/",
    "tests/kernels/test_decode_sparse.py",
    "tests/kernels/test_gradients.py",
    "tests/tuner/",
    "tests/test_workspace_recipes.py",
    "tests/baselines/test_chunked.py",
)


def _rank(nodeid: str) -> int:
  return next((i for i, prefix in enumerate(_SLOW_FIRST) if nodeid.startswith(prefix)), len(_SLOW_FIRST))


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  items.sort(key=lambda item: _rank(item.nodeid))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops every compiled executable after each test file, so one process running many files (a serial
  run, or an xdist worker) holds only the current file's compiled code. A serial run of the whole suite,
  which kept everything, segfaulted inside XLA's CPU compilation at ~70 % (the same test passes alone);
  bounded code memory is the suspected cure (e.g. the kernel's 65,530 memory-map limit)."""
  yield
  jax.clear_caches()
