"""Llama forward parity with transformers, the policy seam, layer-wise capture and input checks."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afbs_jax.model import DenseAttention, Llama, build_model, init_random, iter_layer_qkv
from afbs_jax.model.llama import jitted_forward
from afbs_jax.model.weights import expected_shapes, model_tensors
import configs
from tests.model.conftest import HF_KWARGS, causal_attention_numpy, config_of, hf_logits, make_hf_llama, state_dict_of

TOLERANCE = 1e-4  # max |Δlogit| against transformers in float32.


def from_hf(hf_model, **kwargs) -> Llama:
  return build_model(config_of(hf_model), state_dict_of(hf_model), **kwargs)


@pytest.fixture(scope="module")
def untied_hf():
  """The GQA model most single-variant tests share (module scope: built and compiled once)."""
  return make_hf_llama(tied=False)


@pytest.mark.parametrize("shape", [(2, 40), (1, 64)], ids=["batch2", "full_context"])
def test_logits_match_transformers(hf_llama, shape):
  model = from_hf(hf_llama)
  tokens = np.random.default_rng(1).integers(0, HF_KWARGS["vocab_size"], size=shape, dtype=np.int32)
  ours = model(tokens)
  assert ours.dtype == jnp.float32 and ours.shape == shape + (HF_KWARGS["vocab_size"],)
  np.testing.assert_allclose(np.asarray(ours), hf_logits(hf_llama, tokens), atol=TOLERANCE, rtol=0)


def test_single_token_matches_transformers(untied_hf):
  tokens = np.array([[7]], np.int32)
  np.testing.assert_allclose(np.asarray(from_hf(untied_hf)(tokens)), hf_logits(untied_hf, tokens),
                             atol=TOLERANCE, rtol=0)


def test_rope_theta_and_multi_head_kv_match_transformers(tokens):
  """SmolLM2's RoPE base, and plain multi-head attention (kv_heads == heads, as Llama-2)."""
  hf_model = make_hf_llama(tied=True, rope_theta=100000.0, num_key_value_heads=4, seed=3)
  np.testing.assert_allclose(np.asarray(from_hf(hf_model)(tokens)), hf_logits(hf_model, tokens),
                             atol=TOLERANCE, rtol=0)


def test_accepts_jax_and_numpy_int_tokens(untied_hf, tokens):
  model = from_hf(untied_hf)
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(model(jnp.asarray(tokens))))
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(model(tokens.astype(np.int64))))


def test_bfloat16_weights_give_float32_logits_near_float32_model(untied_hf, tokens):
  model = from_hf(untied_hf, param_dtype="bfloat16")
  assert model.config.param_dtype == "bfloat16"
  assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  logits = model(tokens)
  assert logits.dtype == jnp.float32
  reference = hf_logits(untied_hf, tokens)
  # bfloat16 keeps ~3 significant digits; the tiny model's logits are O(1).
  assert np.max(np.abs(np.asarray(logits) - reference)) < 0.05 * np.max(np.abs(reference))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 65), np.int32), "exceeds the context"),
    (np.zeros((4,), np.int32), r"\[batch, seq\]"),
    (np.zeros((1, 0), np.int32), r"\[batch, seq\]"),
    (np.zeros((1, 4), np.float32), "integer"),
    (np.full((1, 4), HF_KWARGS["vocab_size"], np.int32), r"token ids must lie in \[0, vocab_size=96\)"),
    (np.full((1, 4), -1, np.int32), r"got ids in \[-1, -1\]"),
])
def test_bad_tokens_raise_clear_errors(untied_hf, bad, match):
  with pytest.raises(ValueError, match=match):
    from_hf(untied_hf)(bad)


class ScaledDense:
  """Test policy: dense attention times a traced scale (an array leaf, like per-head thresholds)."""

  def __init__(self, scale):
    self.scale = scale

  def __call__(self, q, k, v, *, layer):
    return DenseAttention()(q, k, v, layer=layer) * self.scale[layer]


jax.tree_util.register_pytree_node(ScaledDense, lambda p: ((p.scale,), None), lambda _, c: ScaledDense(*c))


def test_with_attention_shares_weights_and_routes_every_layer(untied_hf, tokens):
  model = from_hf(untied_hf)
  dense = np.asarray(model(tokens))
  ones = model.with_attention(ScaledDense(jnp.ones(2)))
  assert ones.layers is model.layers and ones.embed_tokens is model.embed_tokens
  np.testing.assert_allclose(np.asarray(ones(tokens)), dense, atol=1e-6)
  # Silencing attention in layer 1 only must change the logits; the original model stays dense.
  silenced = np.asarray(model.with_attention(ScaledDense(jnp.array([1.0, 0.0])))(tokens))
  assert np.max(np.abs(silenced - dense)) > 1e-2
  np.testing.assert_array_equal(np.asarray(model(tokens)), dense)


def test_new_policy_values_reuse_the_compiled_forward(untied_hf, tokens):
  model = from_hf(untied_hf)
  model.with_attention(ScaledDense(jnp.array([1.0, 0.5])))(tokens)
  compiled = jitted_forward._cache_size()
  model.with_attention(ScaledDense(jnp.array([0.3, 0.9])))(tokens)
  assert jitted_forward._cache_size() == compiled


def test_plain_callable_policies_are_static(untied_hf, tokens):
  """Non-pytree policies (closures, plain objects) are compiled in; they must still route every layer."""
  model = from_hf(untied_hf)
  dense = np.asarray(model(tokens))
  halved = model.with_attention(lambda q, k, v, *, layer: 0.5 * DenseAttention()(q, k, v, layer=layer))
  assert np.max(np.abs(np.asarray(halved(tokens)) - dense)) > 1e-2
  np.testing.assert_allclose(np.asarray(model.with_attention(DenseAttention().__call__)(tokens)), dense, atol=1e-6)


def test_with_attention_rejects_pytree_policies_with_non_array_leaves(untied_hf):
  with pytest.raises(ValueError, match="only have array leaves"):
    from_hf(untied_hf).with_attention(ScaledDense("not an array"))


def test_with_attention_rejects_non_callable(untied_hf):
  with pytest.raises(ValueError, match="policy must be callable"):
    from_hf(untied_hf).with_attention(0.5)


def test_iter_layer_qkv_reproduces_transformers_layers(hf_llama, tokens):
  """Each layer's captured q/k/v, attended by an independent reference and pushed through HF's own
  o_proj and MLP, must give HF's output of that layer."""
  torch = pytest.importorskip("torch")
  layer_io = []
  hooks = [layer.register_forward_hook(lambda _, args, out: layer_io.append((args[0], out)))
           for layer in hf_llama.model.layers]
  hf_logits(hf_llama, tokens)
  for hook in hooks:
    hook.remove()
  captured = list(iter_layer_qkv(from_hf(hf_llama), tokens))
  assert [index for index, *_ in captured] == list(range(HF_KWARGS["num_hidden_layers"]))
  for (index, q, k, v), (layer_in, layer_out) in zip(captured, layer_io):
    assert q.shape == (2, 40, 4, 16) and k.shape == v.shape == (2, 40, 2, 16)
    hf_layer = hf_llama.model.layers[index]
    attended = torch.as_tensor(causal_attention_numpy(q, k, v).reshape(2, 40, -1), dtype=torch.float32)
    with torch.no_grad():
      h = layer_in + hf_layer.self_attn.o_proj(attended)
      expected = h + hf_layer.mlp(hf_layer.post_attention_layernorm(h))
    layer_out = layer_out[0] if isinstance(layer_out, tuple) else layer_out
    np.testing.assert_allclose(expected.numpy(), layer_out.numpy(), atol=1e-4, rtol=0)


def test_iter_layer_qkv_ignores_the_model_policy(untied_hf, tokens):
  model = from_hf(untied_hf)
  silenced = model.with_attention(ScaledDense(jnp.zeros(2)))
  for (_, *dense), (_, *from_silenced) in zip(iter_layer_qkv(model, tokens), iter_layer_qkv(silenced, tokens)):
    for a, b in zip(dense, from_silenced):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_build_model_round_trips_tensors(hf_llama):
  tensors = state_dict_of(hf_llama)
  rebuilt = model_tensors(build_model(config_of(hf_llama), tensors))
  assert rebuilt.keys() == tensors.keys()
  for name, value in tensors.items():
    np.testing.assert_array_equal(rebuilt[name], value, err_msg=name)


def test_build_model_names_wrong_missing_and_surplus_tensors(untied_hf):
  config = config_of(untied_hf)
  wrong = state_dict_of(untied_hf)
  wrong["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(64, 64\).*\(32, 64\)"):
    build_model(config, wrong)
  missing = state_dict_of(untied_hf)
  del missing["model.layers.0.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing.*model\.layers\.0\.mlp\.up_proj\.weight"):
    build_model(config, missing)
  surplus = state_dict_of(untied_hf) | {"model.layers.2.mlp.up_proj.weight": np.zeros((112, 64), np.float32)}
  with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.2\.mlp\.up_proj\.weight"):
    build_model(config, surplus)
  integer = state_dict_of(untied_hf)
  integer["model.norm.weight"] = np.ones(64, np.int32)
  with pytest.raises(ValueError, match=r"model\.norm\.weight.*dtype int32"):
    build_model(config, integer)


@pytest.mark.parametrize("name, num_params", [
    ("smollm2", 134_515_008),      # SmolLM2-135M as published (tied embeddings).
    ("llama2", 6_738_415_616),     # Llama-2-7B.
    ("llama2-13b", 13_015_864_320),
])
def test_full_size_configs_have_published_parameter_counts(name, num_params):
  config = configs.get_config(name).model
  assert sum(int(np.prod(s)) for s in expected_shapes(config).values()) == num_params


@pytest.mark.parametrize("name", ["smollm2", "llama2"])
def test_weight_table_covers_exactly_the_module_parameters(name):
  """Shapes only (nnx.eval_shape allocates nothing), on a 2-layer cut of the full-size config."""
  config = dataclasses.replace(configs.get_config(name).model, num_layers=2)
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  module_shapes = sorted(tuple(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  table_shapes = sorted(shape[::-1] if len(shape) == 2 and "proj" in n else shape
                        for n, shape in expected_shapes(config).items())
  assert module_shapes == table_shapes


def test_tiny_random_model_runs_in_float32_and_is_seeded():
  config = configs.get_config("tiny").model
  tokens = np.arange(32, dtype=np.int32)[None] % config.vocab_size
  logits = np.asarray(init_random(config, seed=0)(tokens))
  assert logits.shape == (1, 32, config.vocab_size) and logits.dtype == np.float32
  assert np.all(np.isfinite(logits)) and logits.std() > 0
  np.testing.assert_array_equal(np.asarray(init_random(config, seed=0)(tokens)), logits)
  assert np.max(np.abs(np.asarray(init_random(config, seed=1)(tokens)) - logits)) > 1e-3


@pytest.mark.parametrize("changes, match", [
    (dict(num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(param_dtype="int8"), "param_dtype='int8'"),
])
def test_config_rejects_bad_values(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(configs.get_config("tiny").model, **changes)


def test_config_registry():
  assert {name: configs.get_config(name).model.num_layers for name in configs.CONFIG_MODULES} == {
      "smollm2": 30, "llama2": 32, "llama2-13b": 40, "tiny": 2}
  assert [configs.get_config(name).model_format for name in ("smollm2", "llama2", "tiny")] == ["gguf", "hf", "random"]
  with pytest.raises(ValueError, match="unknown config name='llama3'"):
    configs.get_config("llama3")
