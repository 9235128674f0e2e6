"""benchmarks.decode_bench on CPU: the tiny model, one batch size, the jnp reference; the JSON and Markdown
it writes, the budgets it picks, and the merge of a second run into the same file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks import decode_bench
from kernels.decode_sparse import DEFAULT_SELECTION

QUICK = decode_bench.Settings(models=("tiny",), weights="random", batches=(1,), steps=4, runs=1, sparsities=(0.75,),
                              tau=0.9, block_size=16, backend="reference", attention_iters=1, quick=True,
                              num_splits=(1,))


def test_budgets_hit_their_target_sparsity():
  assert decode_bench.top_k_for(0.5, 128) == 62 and decode_bench.top_k_for(0.9, 512) == 49
  assert decode_bench.top_k_for(0.99, 10) == 1  # never below one block besides the forced ones


def test_quick_run_writes_json_and_markdown(tmp_path):
  output = tmp_path / "decode_bench.json"
  decode_bench.run(QUICK, str(output))
  results = json.loads(output.read_text())
  entry = results["models"]["tiny"]
  assert (entry["context"], entry["prompt_len"], entry["num_layers"]) == (256, 251, 2)
  decode = entry["batches"]["1"]["decode"]
  assert list(decode) == ["dense", "top_k@0.75", "top_k@0.75 re-pooled", "tau=0.9", "top_k@0.75 split=1"]
  assert decode["dense"]["decode_sparsity"] == 0.0 and decode["dense"]["speedup"] == 1.0
  # 16 valid blocks: top-k 2 plus the sink and local blocks keep 4, sparsity 0.75 at every step.
  assert decode["top_k@0.75"]["decode_sparsity"] == pytest.approx(0.75)
  assert decode["top_k@0.75 re-pooled"]["decode_sparsity"] == pytest.approx(0.75)
  assert decode["top_k@0.75 split=1"]["decode_sparsity"] == pytest.approx(0.75)   # split-K: same blocks
  for row in decode.values():
    assert row["decode_steps"] == 4 and row["tokens_per_s"] > 0 and row["ms_per_token"] > 0
  attention = entry["batches"]["1"]["attention"]
  assert set(attention) == {"dense", "top_k@0.75", "top_k@0.75 re-pooled", "top_k@0.75 split=1", "selection",
                            "selection tau"}
  # Selection sorts the candidates once whatever the rule; τ's top-p adds its softmax and cumulative sum.
  assert attention["selection"]["op_kinds"]["sort"] == attention["selection tau"]["op_kinds"]["sort"] == 1
  assert attention["selection tau"]["ops"] > attention["selection"]["ops"] > 1
  for row in attention.values():
    assert row["ops"] == sum(row["op_kinds"].values()) and "parameter" not in row["op_kinds"]
  assert entry["environment"]["platform"] == "cpu"
  table = (tmp_path / "decode_bench.md").read_text()
  assert "## tiny at 256 context" in table and "| 1 | top-k 2 (target sparsity 0.75) | 0.750 |" in table
  assert "| 1 | top-k 2, split-K 1 (no split) | 0.750 |" in table
  assert "| vs dense | XLA ops |" in table and f"| {attention['selection']['ops']} |" in table



def test_a_later_run_merges_its_batches_into_the_file(tmp_path, monkeypatch):
  """--batches=1, then --batches=4: one entry per model holds both (the run itself is faked here)."""
  output = tmp_path / "decode_bench.json"
  fake = dict(model="tiny", num_layers=2, context=256, prompt_len=251, weights="random", param_dtype="float32",
              block_size=16, backend="reference", steps=4, runs=1)
  rows = {"dense": dict(label="dense", decode_sparsity=0.0, ms_per_token=1.0, tokens_per_s=1e3, speedup=1.0)}
  batches = iter([{"1": dict(decode=rows, attention={})}, {"4": dict(skipped="skipped: too big")}])
  monkeypatch.setattr(decode_bench, "run_model", lambda name, settings: fake | {"batches": next(batches)})
  decode_bench.run(QUICK, str(output))
  decode_bench.run(QUICK, str(output))
  merged = json.loads(output.read_text())["models"]["tiny"]["batches"]
  assert merged == {"1": dict(decode=rows, attention={}), "4": dict(skipped="skipped: too big")}
  assert "| 4 | skipped: too big |" in (tmp_path / "decode_bench.md").read_text()


def test_num_splits_flag_values():
  assert decode_bench._parse_splits(["1", "4"]) == (1, 4)   # pylint: disable=protected-access
  assert decode_bench._parse_splits([]) == ()   # pylint: disable=protected-access
  for bad in ("0", "x", "-2", "auto"):
    with pytest.raises(decode_bench.app.UsageError, match="not an integer >= 1"):
      decode_bench._parse_splits([bad])   # pylint: disable=protected-access


@pytest.mark.parametrize("selection", decode_bench.EXTRA_SELECTIONS)
def test_other_selections_time_every_budget_and_tau_again(selection):
  assert selection != DEFAULT_SELECTION
  settings = dataclasses.replace(QUICK, sparsities=(0.5, 0.9), selections=(selection,))
  rows = decode_bench.variants(settings, valid_blocks=64)
  extra = {name: policy for name, (_, policy) in rows.items() if name.endswith(f" {selection}")}
  assert list(extra) == [f"top_k@0.5 {selection}", f"top_k@0.9 {selection}", f"tau=0.9 {selection}"]
  assert all(policy.selection == selection for policy in extra.values())
  assert [int(p.top_k) for p in extra.values() if p.top_k is not None] == [30, 4]
  assert all(policy.selection == DEFAULT_SELECTION for name, (_, policy) in rows.items()
             if policy is not None and name not in extra)
  plain = dataclasses.replace(settings, selections=())
  assert all(policy is None or policy.selection == DEFAULT_SELECTION
             for _, policy in decode_bench.variants(plain, valid_blocks=64).values())


def test_the_sort_lists_decode_at_the_pallas_lists_sparsity(tmp_path):
  # The default selection (the Pallas kernel's lists, interpreted) and the XLA sort's inside the timed decode
  # loop: same budgets, so the same decode sparsity; the Pallas selection is also timed alone.
  settings = dataclasses.replace(QUICK, backend="interpret", steps=2, num_splits=(), selections=("lists",))
  entry = decode_bench.run(settings, str(tmp_path / "decode_bench.json"))["models"]["tiny"]
  assert entry["selection"] == DEFAULT_SELECTION == "pallas_lists"
  decode = entry["batches"]["1"]["decode"]
  assert decode["top_k@0.75 lists"]["decode_sparsity"] == pytest.approx(decode["top_k@0.75"]["decode_sparsity"])
  assert decode["top_k@0.75 lists"]["label"].endswith("ranked by the XLA sort")
  assert 0.0 < decode["tau=0.9"]["decode_sparsity"] < 1.0
  assert entry["batches"]["1"]["attention"]["selection pallas_lists"]["us"] > 0
  assert '("pallas_lists": listed by a Pallas kernel)' in (tmp_path / "decode_bench.md").read_text()
