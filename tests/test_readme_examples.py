"""README.md's library examples (```python example:NAME blocks), run as written."""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from afbs_jax.tuner.synthetic import PowerLawHeads
from tests.test_layers import write_tiny_checkpoint

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str) -> dict:
  with open(os.path.join(_REPO, "README.md"), encoding="utf-8") as f:
    blocks = re.findall(rf"```python example:{name}\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1, f"README.md must hold exactly one `example:{name}` block"
  namespace: dict = {"__name__": f"readme_{name}"}
  exec(compile(blocks[0], f"README.md:example:{name}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_flax_layer_example(tmp_path, monkeypatch):
  # What `python -m afbs_jax.main --model=tiny` leaves in outputs/tiny/checkpoint: 2 layers × 4 heads, 16×16.
  tuned = write_tiny_checkpoint(tmp_path / "outputs" / "tiny" / "checkpoint", block_q=16, block_k=16,
                                model_name="tiny")
  monkeypatch.chdir(tmp_path)
  namespace = run_example("flax_layer")
  assert np.isfinite(float(namespace["loss"]))
  grads = jax.tree_util.tree_leaves_with_path(namespace["grads"])
  assert len(grads) == 2 * 5  # per block: RMSNorm scale, qkv kernel and bias, out kernel and bias
  for path, grad in grads:
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0), jax.tree_util.keystr(path)
  attention = namespace["blocks"][1].attention
  np.testing.assert_array_equal(attention.tau[...], tuned.tau[1])
  assert attention.attention_sink and (attention.block_q, attention.block_k) == (16, 16)


def test_tune_heads_example():
  namespace = run_example("tune_heads")
  result, heads = namespace["result"], namespace["heads"]
  assert isinstance(heads, PowerLawHeads)
  assert np.all(result.error <= 0.055)
  boundary = heads.boundary(0.055, input_indices=range(6))   # the largest s that validates, per head
  assert np.all(result.s <= boundary + 1e-6) and np.all(result.s >= 0.8 * boundary), (result.s, boundary)
  np.testing.assert_array_equal(namespace["attention"].tau[...], result.tau)
