"""experiments.sfa_pretrain in quick mode: the schema, falling losses and the FLOP accounting."""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np

from experiments import sfa_pretrain
from tests.kernels import _oracles


def test_quick_run_trains_every_variant(tmp_path):
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
  dense, sfa, short = rows["dense"], rows["sfa_k8"], rows["short_k8"]
  assert sfa["params"] == dense["params"] > short["params"]
  assert sfa["attention_flops"]["sparse_model"] < dense["attention_flops"]["sparse_model"]
  assert short["attention_flops"]["computed"] < sfa["attention_flops"]["computed"] == dense["attention_flops"]["computed"]


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
