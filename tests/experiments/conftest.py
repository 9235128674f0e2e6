"""Quick-mode experiment runs share one work directory, so AFBS-BO tunes the tiny model once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("experiments_work"))
