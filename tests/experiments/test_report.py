"""experiments.report: sections from JSON, placeholders for missing runs, README regeneration."""

from __future__ import annotations

import json

import pytest

from experiments import main_table, report


def _payload():
  rows = [{"method": name, "strategy": name, "granularity": "block", "target": 0.5, "sparsity": sparsity,
           "block_sparsity": sparsity, "token_sparsity": sparsity, "ppl": ppl, "delta_ppl": ppl - 10.0,
           "delta_ppl_percent": 10.0 * (ppl - 10.0), "attention_flops_fraction": 1 - sparsity,
           "kv_dense_mb": 4.0, "kv_kept_mb": 4.0 * (1 - sparsity)}
          for name, sparsity, ppl in (("dense", 0.0, 10.0), ("afbs", 0.5, 10.2), ("window", 0.5, 11.0),
                                      ("topk_block", 0.5, 10.1))]
  return {"experiment": "main_table", "rows": rows, "target_sparsity": 0.5, "band": [0.045, 0.055],
          "dense_ppl": 10.0, "paper": {name: {"sparsity": s, "ppl": p} for name, (s, p) in main_table.PAPER.items()},
          "setting": {"model": "smollm2", "context": 8192, "block_size": 64},
          "environment": {"device": "H200", "platform": "gpu", "jax": "0.11.2", "date": "2026-12-01",
                          "commit": "abc"}}


def test_report_renders_present_sections_and_names_missing_ones(tmp_path):
  (tmp_path / "main_table.json").write_text(json.dumps(_payload()))
  text = report.build(str(tmp_path))
  assert "## Table I" in text and "| afbs |" in text and "H200" in text
  assert "AFBS-BO reaches 50.0% block sparsity at ΔPPL +2.00%" in text
  assert "better than every non-oracle baseline" in text and "2.00× the top-k block oracle" in text
  assert "Not run yet: `python -m experiments.passkey` writes it.\n" in text
  # An experiment that cannot run offline says why beside its command.
  assert "Not run yet: `python -m experiments.downstream` writes it. It needs HellaSwag" in text


def test_readme_table_is_regenerated_between_markers(tmp_path):
  (tmp_path / "main_table.json").write_text(json.dumps(_payload()))
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{report.README_BEGIN}\nold table\n{report.README_END}\nrest\n")
  assert report.update_readme(str(readme), str(tmp_path))
  text = readme.read_text()
  assert "old table" not in text and "| window |" in text and text.startswith("intro") and text.endswith("rest\n")
  readme.write_text("no markers\n")
  with pytest.raises(ValueError, match="no"):
    report.update_readme(str(readme), str(tmp_path))
