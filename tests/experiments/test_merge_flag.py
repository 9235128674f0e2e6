"""--merge_from through the experiments' absl mains: pareto and frontier join partial results instead of
measuring; every other experiment refuses the flag rather than silently starting a measurement."""

from __future__ import annotations

from absl import app
from absl import flags
from absl.testing import flagsaver
import pytest

from experiments import common, frontier, main_table, pareto


@pytest.fixture(autouse=True)
def parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def test_experiments_without_a_merge_refuse_the_flag():
  measured = []
  main = common.main_for(lambda *args, **kwargs: measured.append(1), str)
  with flagsaver.flagsaver(merge_from=["somewhere"]):
    with pytest.raises(app.UsageError, match="does not merge partial results"):
      main([])
    with pytest.raises(app.UsageError, match="does not merge partial results"):
      main_table.main([])
  assert not measured


def test_main_with_merge_merges_instead_of_measuring(capsys, tmp_path):
  calls = []
  main = common.main_with_merge(lambda argv: calls.append(("measure", argv)),
                                lambda setting, sources, results_dir: calls.append((sources, results_dir)) or {},
                                lambda payload: "table", lambda payload: "discussion")
  with flagsaver.flagsaver(merge_from=["a", "b"], results_dir=str(tmp_path)):
    main(["prog"])
  assert calls == [(["a", "b"], str(tmp_path))]
  assert capsys.readouterr().out == "table\n\ndiscussion\n"
  with flagsaver.flagsaver(merge_from=None):
    main(["prog"])
  assert calls[-1] == ("measure", ["prog"])


@pytest.mark.parametrize("module", [pareto, frontier], ids=["pareto", "frontier"])
def test_pareto_and_frontier_mains_merge(module, tmp_path):
  """Their mains go to their own merge (which refuses a directory without results), not to a measurement."""
  with flagsaver.flagsaver(merge_from=[str(tmp_path / "nothing")], results_dir=str(tmp_path), quick=True):
    with pytest.raises(ValueError, match="does not exist"):
      module.main(["prog"])
