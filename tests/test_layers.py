"""afbs_jax.SparseAttention in a model of our own (not the repository's Llama): jit, gradients w.r.t. the
model's parameters through the kernel, and the thresholds of a tuned checkpoint.

Gradients run on the jnp reference backend, whose VJP defines every backend's gradient.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import afbs_jax
from afbs_jax import checkpoint
from afbs_jax.layers import SparseAttention, SparsityThreshold, sparse_attention
from kernels.sparge import SpargeParams, sparge_attention

VOCAB, DIM, HEADS, KV_HEADS, SEQ, BLOCK = 64, 32, 4, 2, 64, 16
HEAD_DIM = DIM // HEADS


class Block(nnx.Module):
  """Pre-norm block: GQA attention through `attention`, then a GELU MLP."""

  def __init__(self, attention: nnx.Module, *, rngs: nnx.Rngs):
    self.attention = attention
    self.norm1, self.norm2 = nnx.LayerNorm(DIM, rngs=rngs), nnx.LayerNorm(DIM, rngs=rngs)
    self.q = nnx.Linear(DIM, HEADS * HEAD_DIM, rngs=rngs)
    self.kv = nnx.Linear(DIM, 2 * KV_HEADS * HEAD_DIM, rngs=rngs)
    self.out = nnx.Linear(HEADS * HEAD_DIM, DIM, rngs=rngs)
    self.up, self.down = nnx.Linear(DIM, 2 * DIM, rngs=rngs), nnx.Linear(2 * DIM, DIM, rngs=rngs)

  def __call__(self, x):                                   # [batch, seq, DIM]
    batch, seq, _ = x.shape
    h = self.norm1(x)
    q = self.q(h).reshape(batch, seq, HEADS, HEAD_DIM)
    k, v = jnp.split(self.kv(h).reshape(batch, seq, 2 * KV_HEADS, HEAD_DIM), 2, axis=2)
    x = x + self.out(self.attention(q, k, v).reshape(batch, seq, DIM))
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TwoBlockLM(nnx.Module):
  def __init__(self, attentions, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.blocks = nnx.List([Block(attention, rngs=rngs) for attention in attentions])
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, tokens):                              # int [batch, seq] -> [batch, seq, VOCAB]
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class DenseReference(nnx.Module):
  """Exact causal attention in f32, to check the all-kept sparse model and its gradients against."""

  def __call__(self, q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _qkv(seed: int, batch: int = 1, dtype=jnp.float32):
  """q: [batch, SEQ, HEADS, HEAD_DIM]; k, v: [batch, SEQ, KV_HEADS, HEAD_DIM].

  Drawn in numpy: `jax.random.normal` compiles a threefry program per shape and dtype (~1.5 s of CPU
  each, four here), for inputs that need only be Gaussian."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, SEQ, heads, HEAD_DIM)), dtype)
               for heads in (HEADS, KV_HEADS, KV_HEADS))


def _tokens(seed: int = 0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, SEQ)), jnp.int32)


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def _loss_and_grads(model, tokens):
  return nnx.value_and_grad(_loss)(model, tokens)


def _sparse(**overrides):
  fields = dict(tau=[0.5, 0.6, 0.7, 0.9], theta=[-0.1, 0.0, 0.1, 0.2], lam=[-4.0, -8.0, -np.inf, -6.0],
                block_q=BLOCK, block_k=BLOCK, backend="reference")
  fields.update(overrides)
  return SparseAttention(**fields)


def test_all_kept_model_and_gradients_match_dense_attention():
  tokens = _tokens()
  keep_all = [SparseAttention.keep_all(HEADS, block_q=BLOCK, block_k=BLOCK, backend="reference")
              for _ in range(2)]
  sparse_loss, sparse_grads = _loss_and_grads(TwoBlockLM(keep_all), tokens)
  dense_loss, dense_grads = _loss_and_grads(TwoBlockLM([DenseReference(), DenseReference()]), tokens)
  np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-6)
  sparse_leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(sparse_grads))
  dense_leaves = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(dense_grads)))
  assert len(sparse_leaves) == len(dense_leaves) == 2 * 14 + 3   # Params only: no thresholds
  for path, grad in sparse_leaves:
    np.testing.assert_allclose(grad, dense_leaves[path], rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_sparse_model_trains_its_params_and_leaves_thresholds_alone():
  model = TwoBlockLM([_sparse(), _sparse(attention_sink=True)])
  thresholds = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, SparsityThreshold)))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss, grads

  tokens = _tokens(1)
  losses = []
  for _ in range(5):
    loss, grads = step(model, optimizer, tokens)
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, SparsityThreshold)))
  jax.tree.map(np.testing.assert_array_equal, after, thresholds)
  for path, grad in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
    assert np.all(np.isfinite(grad)) and np.any(grad != 0), jax.tree_util.keystr(path)


def test_new_threshold_values_reuse_the_compiled_step():
  layer = _sparse()
  traces = []

  @nnx.jit
  def attend(layer, q, k, v):
    traces.append(None)
    return layer(q, k, v)

  q, k, v = _qkv(0)
  before = attend(layer, q, k, v)
  layer.tau[...] = jnp.ones(HEADS)
  layer.theta[...] = jnp.ones(HEADS)
  layer.lam[...] = jnp.full(HEADS, -jnp.inf, jnp.float32)   # weak-typed values would retrace
  after = attend(layer, q, k, v)
  assert len(traces) == 1
  assert not np.allclose(before, after)
  np.testing.assert_allclose(after, DenseReference()(q, k, v), rtol=1e-5, atol=1e-6)


def write_tiny_checkpoint(path, *, num_layers=2, block_q=BLOCK, block_k=2 * BLOCK,
                          model_name="two-block") -> checkpoint.TunedParams:
  """A finished SpargeAttn checkpoint of `num_layers` × HEADS random thresholds, attention sink on."""
  rng = np.random.default_rng(0)
  shape = (num_layers, HEADS)
  tuned = checkpoint.TunedParams(
      params={"tau": rng.uniform(0.5, 1.0, shape).astype(np.float32),
              "theta": rng.uniform(-0.1, 0.2, shape).astype(np.float32),
              "lam": rng.uniform(-12.0, -4.0, shape).astype(np.float32)},
      s=rng.uniform(size=shape).astype(np.float32), error=np.full(shape, 0.05, np.float32),
      sparsity=np.full(shape, 0.3, np.float32), num_calls=np.full(num_layers, 20, np.int32),
      metadata={"model_name": model_name, "method": "sparge", "method_options": {"attention_sink": True},
                "blocks": {"block_q": block_q, "block_k": block_k}, "layers_done": num_layers})
  checkpoint.save_tuned(path, tuned)
  return tuned


def test_round_trip_from_a_tuned_checkpoint(tmp_path):
  written = write_tiny_checkpoint(tmp_path)
  tuned = checkpoint.load_tuned(tmp_path)
  layers = [SparseAttention.from_tuned(tuned, layer, backend="reference") for layer in range(2)]
  assert layers[1].block_q == BLOCK and layers[1].block_k == 2 * BLOCK and layers[1].attention_sink
  for layer, attention in enumerate(layers):
    for name in ("tau", "theta", "lam"):
      np.testing.assert_array_equal(attention.__getattribute__(name)[...], written.params[name][layer])
  from_path = SparseAttention.from_checkpoint(tmp_path, 1, backend="reference")
  state = lambda module: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))
  jax.tree.map(np.testing.assert_array_equal, state(from_path), state(layers[1]))

  # The layer computes what the checkpoint's model policy computes for that layer, and what the kernel
  # computes with the same parameters.
  q, k, v = _qkv(1)
  policy = checkpoint.attention_policy(tuned, backend="reference")
  np.testing.assert_array_equal(layers[1](q, k, v), policy(q, k, v, layer=1))
  kernel = sparge_attention(q, k, v, SpargeParams(*(tuned.params[n][1] for n in ("tau", "theta", "lam"))),
                            block_q=BLOCK, block_k=2 * BLOCK, attention_sink=True, backend="reference")
  np.testing.assert_array_equal(layers[1](q, k, v), kernel)

  model = TwoBlockLM(layers)
  logits = nnx.jit(lambda model, tokens: model(tokens))(model, _tokens())
  assert logits.shape == (2, SEQ, VOCAB) and np.all(np.isfinite(logits))


def test_function_form_and_package_exports():
  assert afbs_jax.SparseAttention is SparseAttention and afbs_jax.sparse_attention is sparse_attention
  layer = _sparse()
  q, k, v = _qkv(2, batch=2, dtype=jnp.bfloat16)
  out, stats = layer(q, k, v, return_stats=True)
  assert out.shape == q.shape and out.dtype == jnp.bfloat16
  assert stats.density.shape == (2, HEADS) and np.any(np.asarray(stats.density) < 1)
  np.testing.assert_array_equal(out, sparse_attention(q, k, v, tau=layer.tau[...], theta=layer.theta[...],
                                                      lam=layer.lam[...], block_q=BLOCK, block_k=BLOCK,
                                                      backend="reference"))


def test_bad_inputs_say_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="one length"):
    SparseAttention([1.0, 1.0], [1.0, 1.0, 1.0], -math.inf)
  with pytest.raises(ValueError, match="power of two"):
    SparseAttention.keep_all(HEADS, block_q=24)
  layer = SparseAttention.keep_all(HEADS)
  q = jnp.zeros((1, SEQ, HEADS + 1, HEAD_DIM))
  with pytest.raises(ValueError, match=f"heads={HEADS}"):
    layer(q, q, q)
  tuned = write_tiny_checkpoint(tmp_path)
  with pytest.raises(ValueError, match="outside"):
    SparseAttention.from_tuned(tuned, 2)
  tuned.metadata["method_options"]["local_blocks"] = 2
  with pytest.raises(ValueError, match="not supported"):
    SparseAttention.from_tuned(tuned, 0)
  tuned.metadata["method"] = "local_window"
  with pytest.raises(ValueError, match="attention_policy"):
    SparseAttention.from_tuned(tuned, 0)
