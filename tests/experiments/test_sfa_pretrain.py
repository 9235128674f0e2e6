"""experiments.sfa_pretrain in quick mode: the schema, falling losses, the FLOP accounting and needle retrieval."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments import sfa_pretrain
from tests.kernels import _oracles


def test_quick_run_trains_every_variant(tmp_path, monkeypatch):
  setting = sfa_pretrain.QUICK
  payload = sfa_pretrain.run(setting, results_dir=str(tmp_path), backend="auto")
  written = json.loads((tmp_path / "sfa_pretrain_quick.json").read_text())
  assert written["experiment"] == "sfa_pretrain" and written["setting"]["name"] == "quick"
  assert (tmp_path / "sfa_pretrain_quick.png").stat().st_size > 0
  assert sfa_pretrain.render(payload) in (tmp_path / "sfa_pretrain_quick.md").read_text()
  rows = {row["name"]: row for row in written["rows"]}
  assert list(rows) == [variant.name for variant in sfa_pretrain.variants(setting)]
  assert written["tokens_per_variant"] == setting.steps * setting.batch_size * setting.context
  for name, row in rows.items():
    steps = [step for step, _ in row["val_curve"]]
    assert steps[0] == 0 and steps[-1] == setting.steps, name
    first, last = row["val_curve"][0][1], row["final_val_loss"]
    # From about ln(256) at initialisation to well below it: every variant learns.
    assert 4.0 < first < 7.0 and last < first - 1.5 and last == row["val_curve"][-1][1], name
    assert row["train_loss_last"] < row["train_loss_first"], name
    assert math.isclose(row["final_ppl"], math.exp(last)) and row["tokens_per_s"] > 0, name
    assert row["num_prompts"] == setting.needle_prompts, name
    assert 0.0 <= row["needle_exact"] <= row["needle_digit"] <= row["needle_any_digit"] <= 1.0, name
  assert written["needle"]["chance"] == {"digit": 0.1, "exact": 1e-5}
  assert written["needle"]["num_prompts"] == setting.needle_prompts and written["needle"]["context"] == setting.context
  assert "needle exact" in sfa_pretrain.render(payload) and "Needle retrieval at the training context" in sfa_pretrain.render(payload)
  dense, sfa, short = rows["dense"], rows["sfa_k8"], rows["short_k8"]
  assert sfa["params"] == dense["params"] > short["params"]
  assert sfa["attention_flops"]["sparse_model"] < dense["attention_flops"]["sparse_model"]
  assert short["attention_flops"]["computed"] < sfa["attention_flops"]["computed"] == dense["attention_flops"]["computed"]
  assert written["complete"]

  # A run cut off after its first variant resumes with the others only, and ends where one run ends.
  path = tmp_path / "sfa_pretrain_quick.json"
  path.write_text(json.dumps(written | {"rows": written["rows"][:1], "complete": False}))
  trained = []
  monkeypatch.setattr(sfa_pretrain, "train", lambda variant, *args, **kwargs: trained.append(variant.name)
                      or rows[variant.name])
  resumed = sfa_pretrain.run(setting, results_dir=str(tmp_path), backend="auto")
  assert trained == list(rows)[1:] and resumed["rows"] == written["rows"] and resumed["complete"]


def test_attention_flops_match_the_cost_model():
  setting = dataclasses.replace(sfa_pretrain.QUICK, context=4, num_heads=1, num_layers=1)
  pairs = 10   # causal pairs of 4 tokens
  flops = sfa_pretrain.attention_flops(sfa_pretrain.Variant("sfa_k8", "sfa", 8), setting)
  assert flops == {"computed": 2 * pairs * 64 * 2, "sparse_model": 2 * pairs * (8 * 8 / 64 + 64)}


def test_sfa_keeping_every_feature_is_the_dense_seam():
  q, k, v = _oracles.random_qkv(0, q_len=16, kv_len=16, heads=2, kv_heads=2, head_dim=64)
  config = sfa_pretrain.GPTConfig(vocab_size=256, context=16, d_model=64, num_layers=1, num_heads=2,
                                  attention="sfa", sfa_k=64, block_size=16)
  sfa = sfa_pretrain.attention_fn(config)(q, k, v)
  dense = sfa_pretrain.dense_attention(q, k, v)
  np.testing.assert_allclose(np.asarray(sfa), np.asarray(dense), atol=1e-5)
  assert float(jnp.max(jnp.abs(dense - np.asarray(_oracles.dense_attention(q, k, v, causal=True))))) < 1e-5


def _needle(context=64, count=12, seed=3):
  text = ("Four score and seven years ago our fathers brought forth on this continent a new nation. " * 40)
  return sfa_pretrain.needle_prompts(np.frombuffer(text.encode(), np.uint8).astype(np.int32), context, count, seed)


def test_needle_prompts_plant_the_needle_at_the_stated_depth():
  context = 64
  prompts = _needle(context)
  assert prompts.windows.shape == (12, context + 1) and prompts.windows.dtype == np.int32
  assert len(set(prompts.keys)) > 1 and np.array_equal(prompts.windows, _needle(context).windows)   # seeded
  for window, key, depth, start in zip(prompts.windows, prompts.keys, prompts.depths, prompts.needle_starts):
    text = bytes(window.astype(np.uint8)).decode()
    needle = sfa_pretrain.NEEDLE.format(key=key)
    assert len(key) == sfa_pretrain.KEY_DIGITS and key.isdigit()
    assert 0.1 <= depth <= 0.9 and start == round(depth * prompts.haystack)
    assert text[start:start + len(needle)] == needle
    # The window ends with the cue and then the key: the model reads everything but the last byte.
    assert text.endswith(sfa_pretrain.CUE + key)
    assert len(text) - len(needle) - len(sfa_pretrain.CUE) - len(key) == prompts.haystack
    assert text.count(needle) == 1 and "key is" not in text.replace(needle, "").replace(sfa_pretrain.CUE + key, "")


def test_needle_accuracy_scores_an_oracle_one_and_counts_digits():
  prompts = _needle(count=10)
  next_bytes = {row[:-1].tobytes(): row[1:] for row in prompts.windows}

  def oracle(tokens, wrong_position=None):
    targets = np.stack([next_bytes[row.tobytes()] for row in np.asarray(tokens)])
    if wrong_position is not None:   # one answer digit off by one
      column = targets.shape[1] - sfa_pretrain.KEY_DIGITS + wrong_position
      targets[:, column] = (targets[:, column] - ord("0") + 1) % 10 + ord("0")
    return jax.nn.one_hot(targets, 256)

  # batch_size 4 over 10 prompts exercises the padded last chunk.
  perfect = sfa_pretrain.needle_accuracy(oracle, prompts, batch_size=4)
  assert perfect == {"needle_exact": 1.0, "needle_digit": 1.0, "needle_any_digit": 1.0, "num_prompts": 10}
  one_wrong = sfa_pretrain.needle_accuracy(lambda t: oracle(t, wrong_position=2), prompts, batch_size=4)
  assert one_wrong["needle_exact"] == 0.0 and math.isclose(one_wrong["needle_digit"], 0.8)
  assert one_wrong["needle_any_digit"] == 1.0
  # Only the answer positions count: garbage elsewhere does not matter.
  masked = lambda t: oracle(t).at[:, :-sfa_pretrain.KEY_DIGITS].set(0.0)
  assert sfa_pretrain.needle_accuracy(masked, prompts)["needle_exact"] == 1.0
