"""Every benchmark imports into one process: each keeps its flags on its own FlagValues (`benchmarks.cli`)."""

from __future__ import annotations

import importlib
import pkgutil

from absl import flags

import benchmarks


def test_every_benchmark_module_imports_beside_the_others_with_its_own_flags():
  names = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if info.name != "cli")
  modules = [importlib.import_module(f"benchmarks.{name}") for name in names]   # a shared name would raise here
  assert {"kernel_bench", "tuner_bench", "model_throughput", "mosaic_gpu_check"} <= set(names)
  for name, module in zip(names, modules):
    own = getattr(module, "FLAGS", None)
    assert isinstance(own, flags.FlagValues) and own is not flags.FLAGS, name
    assert list(own), f"{name} defines no flags on its FlagValues"
