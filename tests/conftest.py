"""Suite-wide: the slowest files dispatched first, and compiled code released after every file.

The README runs the suite on every core with whole files per worker (`-n auto --dist loadfile`); a slow
file dispatched last would leave one worker running it alone at the end. Sorting is stable, so tests keep
their order inside a file, and a serial run is unaffected apart from the order of files. pytest-xdist
dispatches files in that collection order only with its per-file reordering turned off (below).
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

# Files that each take ten seconds or more on a 2-core CPU, slowest first (longest-processing-time first:
# the short files after them even out the two workers' ends): per-file sums of every test's time in a full
# `-n 2 --dist loadfile --durations=0` run. A slow file dispatched last runs alone at the end.
_SLOW_FIRST = (
    "tests/baselines/test_traced_sparsity.py",
    "tests/baselines/test_policies.py",
    "tests/baselines/test_chunked.py",
    "tests/experiments/test_frontier.py",
    "tests/experiments/test_main_table.py",
    "tests/experiments/test_pareto.py",
    "tests/model/test_generate_decode_sparse.py",
    "tests/kernels/test_decode_sparse.py",
    "tests/kernels/test_block_sparse_triton.py",
    "tests/kernels/test_block_sparse_mosaic.py",
    "tests/experiments/test_downstream.py",
    "tests/kernels/test_block_sparse_mosaic_gpu.py",
    "tests/model/test_precision_policy.py",
    "tests/test_notebooks_execute.py",
    "tests/test_layers.py",
    "tests/model/test_smollm2.py",
    "tests/kernels/test_gradients.py",
    "tests/test_main.py",
    "tests/experiments/test_sfa_pretrain.py",
    "tests/baselines/test_patterns.py",
    "tests/model/test_generate.py",
    "tests/model/test_attention_policies.py",
    "tests/kernels/test_sfa.py",
    "tests/experiments/test_context_length.py",
    "tests/model/test_llama.py",
    "tests/experiments/test_block_size.py",
    "tests/benchmarks/test_decode_bench.py",
    "tests/experiments/test_frontier_compiles.py",
    "tests/kernels/test_sparge_mask.py",
    "tests/experiments/test_local_floor.py",
    "tests/experiments/test_passkey.py",
    "tests/kernels/test_block_index.py",
    "tests/benchmarks/test_kernel_bench.py",
    "tests/tuner/test_decode_tuning.py",
    "tests/kernels/test_sparge_api.py",
    "tests/baselines/test_vertical_slash.py",
    "tests/kernels/test_sparge_reference.py",
    "tests/test_readme_examples.py",
    "tests/tuner/test_evaluator.py",
    "tests/eval/test_perplexity.py",
    "tests/experiments/test_stage_ablation.py",
    "tests/test_workspace_recipes.py",
    "tests/tuner/test_gp.py",
    "tests/benchmarks/test_sfa_bench.py",
    "tests/tuner/test_afbs.py",
)


def _rank(nodeid: str) -> int:
  return next((i for i, prefix in enumerate(_SLOW_FIRST) if nodeid.startswith(prefix)), len(_SLOW_FIRST))


def pytest_configure(config):
  """Dispatches whole files in the collection order above.

  pytest-xdist's file scheduling reorders files by their number of tests, most first, unless told not to
  (`--loadscope-reorder` is on by default): the slow files here hold few tests each, so they went last
  whatever their collection order (the scheduler simulated on one full run's test durations: 929 s that
  way, 898 s in this order, 895 s for an ideal even split).
  """
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


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
