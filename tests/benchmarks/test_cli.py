"""benchmarks.cli: every benchmark imports beside the others (own FlagValues), results are written atomically."""

from __future__ import annotations

import importlib
import pkgutil

from absl import flags

import benchmarks
from benchmarks import cli


def test_every_benchmark_module_imports_beside_the_others_with_its_own_flags():
  helpers = {"cli", "hlo_ops"}   # shared by the benchmarks, no flags of their own
  names = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if info.name not in helpers)
  modules = [importlib.import_module(f"benchmarks.{name}") for name in names]   # a shared name would raise here
  assert {"kernel_bench", "tuner_bench", "model_throughput", "mosaic_gpu_check"} <= set(names)
  for name, module in zip(names, modules):
    own = getattr(module, "FLAGS", None)
    assert isinstance(own, flags.FlagValues) and own is not flags.FLAGS, name
    assert list(own), f"{name} defines no flags on its FlagValues"


def test_results_are_written_whole_or_not_at_all(tmp_path):
  path = str(tmp_path / "out" / "bench.json")
  md = cli.write_results({"ms": float("nan"), "rows": [1]}, path, lambda results: f"rows: {results['rows']}\n")
  assert md == str(tmp_path / "out" / "bench.md") and open(md).read() == "rows: [1]\n"
  assert '"ms": NaN' in open(path).read()   # failed timings stay NaN for the readers that test isnan

  def broken(results):
    raise RuntimeError("markdown failed")

  try:
    cli.write_results({"rows": [2]}, path, broken)
  except RuntimeError:
    pass
  assert '"rows": [\n  1\n ]' in open(path).read() and open(md).read() == "rows: [1]\n"   # both untouched
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.md"]   # no .tmp left
