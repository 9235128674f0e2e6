"""Attention policies: dense numerics and GQA, pytree behaviour, validation, and sparse policies at
all-dense settings reproducing the dense model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from afbs_jax.model import BlockMaskAttention, DenseAttention, SpargeAttention, build_model
from tests.model.conftest import causal_attention_numpy, config_of, make_hf_llama, state_dict_of


def random_qkv(batch=2, seq=48, heads=4, kv_heads=2, head_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, seq, heads, head_dim), dtype=np.float32)
  k, v = (rng.standard_normal((batch, seq, kv_heads, head_dim), dtype=np.float32) for _ in range(2))
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_dense_matches_causal_reference(heads, kv_heads):
  q, k, v = random_qkv(heads=heads, kv_heads=kv_heads)
  out = DenseAttention()(q, k, v, layer=0)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(out), causal_attention_numpy(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shapes, match", [
    (((2, 8, 4, 16), (2, 8, 3, 16), (2, 8, 3, 16)), "multiple of kv heads"),
    (((2, 8, 64), (2, 8, 2, 16), (2, 8, 2, 16)), r"\[batch, seq, heads, head_dim\]"),
    (((2, 8, 4, 16), (2, 8, 2, 16), (2, 9, 2, 16)), "same shape"),
    (((2, 8, 4, 16), (2, 8, 2, 8), (2, 8, 2, 8)), "head_dim"),
])
def test_dense_rejects_bad_shapes(shapes, match):
  q, k, v = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    DenseAttention()(q, k, v, layer=0)


def test_sparge_policy_is_a_pytree_with_static_blocks():
  policy = SpargeAttention.constant(3, 4, tau=0.9, theta=0.5, lam=-5.0, block_q=32, block_k=16,
                                    backend="reference")
  leaves, treedef = jax.tree.flatten(policy)
  assert [leaf.shape for leaf in leaves] == [(3, 4)] * 3
  np.testing.assert_array_equal(np.asarray(leaves[0]), np.full((3, 4), 0.9, np.float32))
  other = SpargeAttention.constant(3, 4, tau=0.5, theta=0.1, lam=-1.0, block_q=32, block_k=16,
                                   backend="reference")
  assert jax.tree.structure(other) == treedef  # New values: same compiled program.
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert (rebuilt.block_q, rebuilt.block_k, rebuilt.backend) == (32, 16, "reference")


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=np.ones(4), theta=np.ones((2, 4)), lam=np.zeros((2, 4))), r"tau must be a \[layers, heads\]"),
    (dict(tau=np.ones((2, 4)), theta=np.ones((2, 3)), lam=np.zeros((2, 4))), "share one"),
    (dict(tau=np.ones((2, 4)), theta=np.ones((2, 4)), lam=np.zeros((2, 4)), block_q=0), "block_q"),
])
def test_sparge_policy_rejects_bad_tables(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SpargeAttention(**({"block_q": 16, "block_k": 16} | kwargs))


def test_sparge_policy_rejects_wrong_layer_or_heads():
  policy = SpargeAttention.constant(2, 4, tau=1.0, theta=1.0, block_q=16, block_k=16)
  q, k, v = random_qkv()
  with pytest.raises(ValueError, match="layer=2"):
    policy(q, k, v, layer=2)
  q6, k6, v6 = random_qkv(heads=6)
  with pytest.raises(ValueError, match="6 heads"):
    policy(q6, k6, v6, layer=0)


def test_block_mask_policy_rejects_wrong_mask_shape():
  policy = BlockMaskAttention(lambda q, k, layer: jnp.ones((2, 4, 3, 2), bool), block_q=16, block_k=16)
  with pytest.raises(ValueError, match=r"\(2, 4, 3, 2\).*layer 1.*\(2, 4, 3, 3\)"):
    policy(*random_qkv(), layer=1)
  with pytest.raises(ValueError, match="mask_fn must be callable"):
    BlockMaskAttention(None, block_q=16, block_k=16)


def all_blocks(q, k, layer, *, block_q=16, block_k=16):
  del layer
  return jnp.ones((q.shape[0], q.shape[2], -(-q.shape[1] // block_q), -(-k.shape[1] // block_k)), bool)


@pytest.fixture(scope="module")
def sparge_setup():
  """One untied GQA model, its tokens and dense logits (the Pallas interpreter is slow: keep it small)."""
  pytest.importorskip("kernels.sparge")
  hf_model = make_hf_llama(tied=False)
  model = build_model(config_of(hf_model), state_dict_of(hf_model))
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 40), dtype=np.int32)
  return model, tokens, np.asarray(model(tokens))


def dense_setting_policy(kind: str, backend: str, config):
  if kind == "sparge":
    return SpargeAttention.constant(config.num_layers, config.num_heads, tau=1.0, theta=1.0, block_q=16,
                                    block_k=16, backend=backend)
  return BlockMaskAttention(all_blocks, block_q=16, block_k=16, backend=backend)


# The Pallas interpreter is slow on CPU: each policy runs on one backend, and each backend once.
@pytest.mark.parametrize("kind, backend", [("sparge", "interpret"), ("block_mask", "reference")])
def test_sparse_policies_at_dense_settings_match_dense_logits(sparge_setup, kind, backend):
  """tau = theta = 1 keeps every causal block and lam = -inf never skips P·V, so logits are dense."""
  model, tokens, dense = sparge_setup
  policy = dense_setting_policy(kind, backend, model.config)
  np.testing.assert_allclose(np.asarray(model.with_attention(policy)(tokens)), dense, atol=1e-4, rtol=0)


def test_sparse_policy_at_sparse_settings_changes_logits(sparge_setup):
  """A guard that the sparse path is really taken: keeping one block per row must move the logits."""
  model, tokens, dense = sparge_setup
  config = model.config
  sparse = SpargeAttention.constant(config.num_layers, config.num_heads, tau=0.0, theta=-1.0, block_q=16,
                                    block_k=16, backend="reference")
  assert np.max(np.abs(np.asarray(model.with_attention(sparse)(tokens)) - dense)) > 1e-2


def test_dense_decode_step_with_q_positions_matches_full_attention_rows():
  """Queries 20..23 against a 48-slot cache filled up to 24: the rows of a full causal run."""
  q, k, v = random_qkv(seq=48)
  full = np.asarray(DenseAttention()(q[:, :24], k[:, :24], v[:, :24], layer=0))
  # The cache holds garbage past the filled part; the positions keep it out of every query's view.
  k_cache, v_cache = k.at[:, 24:].set(1e3), v.at[:, 24:].set(-1e3)
  step = DenseAttention()(q[:, 20:24], k_cache, v_cache, layer=0, q_positions=jnp.arange(20, 24))
  np.testing.assert_allclose(np.asarray(step), full[:, 20:24], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="q_positions must be an int array of shape"):
    DenseAttention()(q[:, 20:24], k, v, layer=0, q_positions=jnp.arange(3))


def test_sparse_policies_refuse_q_positions_until_their_kernels_take_them():
  q, k, v = random_qkv(seq=32)
  sparge = SpargeAttention.constant(1, 4, tau=1.0, theta=1.0, block_q=16, block_k=16, backend="reference")
  with pytest.raises(NotImplementedError, match="prefill only"):
    sparge(q, k, v, layer=0, q_positions=jnp.arange(32))


def test_policies_report_their_sparsity_through_attend():
  q, k, v = random_qkv(seq=64)
  out, sparsity = DenseAttention().attend(q, k, v, layer=0)
  np.testing.assert_array_equal(np.asarray(sparsity), np.zeros((2, 4)))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(DenseAttention()(q, k, v, layer=0)))
  # τ = 0 keeps one block per row (the most probable; the diagonal here): 4 of the 10 causal blocks.
  policy = SpargeAttention.constant(1, 4, tau=0.0, theta=-1.0, block_q=16, block_k=16, backend="reference")
  out, sparsity = policy.attend(q, k, v, layer=0)
  assert np.all(np.asarray(sparsity) >= 0.6 - 1e-6)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(policy(q, k, v, layer=0)))


def test_policies_without_leaves_reach_the_compiled_forward():
  """Leafless pytree policies differ only in static configuration; each must compile its own forward."""
  from afbs_jax import baselines  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  from afbs_jax.model import init_random  # pylint: disable=g-import-not-at-top
  model = init_random(configs.get_config("tiny").model, seed=0)
  tokens = np.random.default_rng(0).integers(0, 256, size=(1, 256)).astype(np.int32)
  outputs = {name: np.asarray(model.with_attention(baselines.get(name, sparsity=0.6, block_size=16))(tokens))
             for name in ("window", "random")}
  assert not np.allclose(outputs["window"], outputs["random"])
  window_again = model.with_attention(baselines.get("window", sparsity=0.6, block_size=16))(tokens)
  np.testing.assert_array_equal(np.asarray(window_again), outputs["window"])
  np.testing.assert_array_equal(np.asarray(model.with_attention(DenseAttention())(tokens)), np.asarray(model(tokens)))


def test_sparge_local_blocks_floor_keeps_the_band_and_lowers_sparsity():
  from afbs_jax.attention.sparge import SpargeMethod
  from kernels.block_config import BlockSparseConfig
  from kernels.block_index import local_block_mask
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((1, 128, 2, 16)), jnp.float32) for _ in range(2))
  blocks = BlockSparseConfig(block_q=16, block_k=16, causal=True, backend="reference")
  # τ = 0: the predictor keeps one block per row; the floor adds the 3 most recent key blocks.
  params = {"tau": jnp.zeros(2), "theta": jnp.full(2, -1.0), "lam": jnp.full(2, -jnp.inf)}
  plain = np.asarray(SpargeMethod(attention_sink=True).block_mask(q, k, params, blocks))
  floored = np.asarray(SpargeMethod(attention_sink=True, local_blocks=3).block_mask(q, k, params, blocks))
  band = local_block_mask(128, 128, block_q=16, block_k=16, window=3)
  np.testing.assert_array_equal(floored, plain | band[None, None])
  assert floored.sum() > plain.sum()
  policy = SpargeMethod(local_blocks=3).policy(
      {name: jnp.zeros((1, 2)) for name in ("tau", "theta", "lam")}, blocks)
  assert policy.local_blocks == 3 and policy.method.options()["local_blocks"] == 3
  with pytest.raises(ValueError, match="local_blocks must be an integer >= 0"):
    SpargeMethod(local_blocks=-1)
