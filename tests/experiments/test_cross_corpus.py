"""experiments.cross_corpus: the quick run's schema and numbers."""

from __future__ import annotations

import json

import numpy as np

from experiments import common, cross_corpus


def test_quick_run_writes_in_and_cross_domain_rows(tmp_path, work_dir):
  payload = cross_corpus.run(common.QUICK, results_dir=str(tmp_path), work_dir=work_dir, backend="reference")
  written = json.loads((tmp_path / "cross_corpus_quick.json").read_text())
  assert written["experiment"] == "cross_corpus" and written["setting"]["name"] == "quick"
  markdown = (tmp_path / "cross_corpus_quick.md").read_text()
  assert "Llama-2-7B" in markdown and "C4" in markdown
  assert [corpus["corpus"] for corpus in payload["corpora"]] == ["sotu", "shakespeare"]
  dense_ppls = []
  for corpus in payload["corpora"]:
    rows = {row["method"]: row for row in corpus["rows"]}
    assert list(rows) == ["dense", "afbs", *cross_corpus.BASELINES]
    assert corpus["eval_tokens"] == common.QUICK.max_eval_tokens
    assert rows["dense"]["delta_ppl"] == 0.0 and rows["dense"]["ppl"] == corpus["dense_ppl"]
    assert 0.0 < corpus["target_sparsity"] < 1.0
    assert abs(rows["afbs"]["sparsity"] - corpus["target_sparsity"]) <= 5e-4
    for name in cross_corpus.BASELINES:  # built at AFBS-BO's sparsity on this corpus
      assert abs(rows[name]["sparsity"] - corpus["target_sparsity"]) <= 0.02, (corpus["corpus"], name)
    for row in rows.values():
      assert np.isfinite(row["ppl"]) and row["ppl"] > 1.0
      assert np.isclose(row["delta_ppl_percent"], 100 * (row["ppl"] / corpus["dense_ppl"] - 1))
    dense_ppls.append(corpus["dense_ppl"])
  assert dense_ppls[0] != dense_ppls[1]  # the second corpus really was scored, not the sotu tokens again
  discussion = cross_corpus.discuss(payload)
  assert "Llama-2-7B" in discussion and "C4" in discussion and "tiny" in discussion
