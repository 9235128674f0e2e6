"""benchmarks.model_throughput's time breakdown on CPU: every step is timed and the parts add up."""

from __future__ import annotations

import numpy as np
import pytest

import configs
from afbs_jax import model as model_lib
from benchmarks import model_throughput


def test_where_time_goes_times_every_step_on_real_layers():
  model = model_lib.init_random(configs.get_config("tiny").model, seed=0)
  config = model.config
  policy = model_lib.SpargeAttention.constant(config.num_layers, config.num_heads, tau=0.9, theta=0.2,
                                              lam=float("-inf"), block_q=16, block_k=16, backend="reference")
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, 64))
  breakdown = model_throughput.where_time_goes(model, tokens, policy, runs=1)
  assert set(breakdown) == {"dense_attention", "sparse_prediction", "sparse_compaction", "sparse_attention",
                            "sparse_kernel"}
  for step in ("dense_attention", "sparse_prediction", "sparse_compaction", "sparse_attention"):
    assert breakdown[step] > 0, step
  assert breakdown["sparse_kernel"] == pytest.approx(
      breakdown["sparse_attention"] - breakdown["sparse_prediction"] - breakdown["sparse_compaction"])


def test_markdown_shows_the_breakdown_as_shares_of_the_dense_forward():
  results = dict(environment=dict(device_kind="H200", platform="gpu", jax="0.11.2"), weights="gguf",
                 settings=dict(config="smollm2", batch=1, seq_len=8192, runs=5),
                 policies={"dense": dict(label="dense", median_s=0.02, tokens_per_s=409600.0)},
                 breakdown_ms={"dense_attention": 8.0, "rest_of_model": 12.0})
  text = model_throughput.markdown(results)
  assert "| dense attention | 8.00 | 40.0% |" in text
  assert "| rest of model | 12.00 | 60.0% |" in text
