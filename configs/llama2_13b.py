"""Llama-2-13B from a Hugging Face directory (set --config.model_path); same tuning as Llama-2-7B."""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import llama2

MODEL = dataclasses.replace(
    llama2.MODEL, name="llama-2-13b", hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
    num_kv_heads=40)


def get_config() -> ml_collections.ConfigDict:
  config = llama2.get_config()
  config.model_name = MODEL.name
  config.model = MODEL
  return config
