"""User errors reach the command line as one line on stderr and exit status 2; Ctrl-C as one line and 130.

Every case runs `afbs_jax.main.run_command` in-process (the CLI's `main` only parses flags and calls it) on
the tiny random model, so the file pays for JAX's import once.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time

import numpy as np
import pytest

from afbs_jax import checkpoint, pipeline
from afbs_jax import main as main_lib
from afbs_jax.tuner import model_tuning
from kernels import block_config

# Tiny lengths: 2 layers, 4 heads, block 16, 32/64-token fidelities, one validation input.
_TINY = {"model": "tiny", "low_len": "32", "high_len": "64", "block_size": "16", "num_validation": "1",
         "eval_context": "32", "max_eval_tokens": "64"}
_DENSE = {"tau": 1.0, "theta": 0.2, "lam": -30.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("corpus") / "words.txt"
  words = np.random.default_rng(0).choice(["state", "union", "people", "nation", "law", "peace"], size=1500)
  path.write_text(" ".join(words), encoding="utf-8")
  return str(path)


def _run(capsys, **values) -> tuple[int, list[str]]:
  """(exit status, non-blank stderr lines) of the CLI on the tiny model with `values` as flags."""
  status = main_lib.run_command(_TINY | values, progress=False)
  return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _assert_one_line(status: int, lines: list[str], *fragments: str, prefix: str = "error: ",
                     expected_status: int = 2) -> None:
  assert status == expected_status and len(lines) == 1, lines
  assert lines[0].startswith(prefix) and all(fragment in lines[0] for fragment in fragments), lines[0]


def _save_checkpoint(output_dir, *, num_layers=2, num_heads=4, layers_done=2, **metadata) -> str:
  """A finished checkpoint in `output_dir`/checkpoint whose metadata fits the tiny model unless overridden."""
  metadata = {"model_name": "tiny", "blocks": {"block_q": 16, "block_k": 16, "causal": True}} | metadata
  tuned = checkpoint.empty_tuned(num_layers, num_heads, _DENSE, metadata)
  tuned.metadata["layers_done"] = layers_done
  path = os.path.join(output_dir, "checkpoint")
  checkpoint.save_tuned(path, tuned)
  return path


# ----------------------------------------------------------------------------------------------
# --dataset=text:PATH
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.txt", b"", "is empty"),
    ("binary.txt", bytes(range(256)) * 8, "holds NUL bytes"),
    ("latin1.txt", "caf\xe9 au lait ".encode("latin-1") * 100, "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("tiny.txt", b"abc", "too short to split"),
])
def test_unusable_text_file_names_the_file(capsys, tmp_path, name, content, fragment):
  (tmp_path / name).write_bytes(content)
  status, lines = _run(capsys, dataset=f"text:{tmp_path / name}", output_dir=str(tmp_path / "out"))
  _assert_one_line(status, lines, str(tmp_path / name), fragment)


def test_directory_without_txt_files(capsys, tmp_path):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "notes.md").write_text("not a .txt file")
  status, lines = _run(capsys, dataset=f"text:{tmp_path / 'texts'}", output_dir=str(tmp_path / "out"))
  _assert_one_line(status, lines, str(tmp_path / "texts"), "holds no .txt files")


def test_binary_file_inside_a_directory_is_named(capsys, tmp_path, corpus):
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.txt").write_text(open(corpus, encoding="utf-8").read())
  (tmp_path / "texts" / "b.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
  status, lines = _run(capsys, dataset=f"text:{tmp_path / 'texts'}", output_dir=str(tmp_path / "out"))
  _assert_one_line(status, lines, str(tmp_path / "texts" / "b.txt"), "NUL bytes")


def test_text_shorter_than_the_fidelity_lengths(capsys, tmp_path, corpus):
  # 2 inputs (calibration + 1 validation) of 256 tokens need 512 bytes; the training split has ~460.
  short = tmp_path / "short.txt"
  short.write_text(open(corpus, encoding="utf-8").read()[:500])
  status, lines = _run(capsys, dataset=f"text:{short}", high_len="256", output_dir=str(tmp_path / "out"))
  _assert_one_line(status, lines, "need 512", "--high_len", "--num_validation")


# ----------------------------------------------------------------------------------------------
# --output_dir, --model_path, --block_size
# ----------------------------------------------------------------------------------------------


def test_output_dir_that_is_a_file(capsys, tmp_path, corpus):
  (tmp_path / "results").write_text("a file")
  status, lines = _run(capsys, dataset=f"text:{corpus}", output_dir=str(tmp_path / "results"))
  _assert_one_line(status, lines, str(tmp_path / "results"), "is a file")
  status, lines = _run(capsys, dataset=f"text:{corpus}", output_dir=str(tmp_path / "results" / "run"))
  _assert_one_line(status, lines, "cannot be written (Not a directory")


def test_output_dir_that_is_not_writable(capsys, tmp_path, corpus, monkeypatch):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  target = str(locked / "run")
  if os.access(locked, os.W_OK):  # root writes anywhere: make the directory refuse as it would a user
    makedirs = os.makedirs

    def refuse(path, *args, **kwargs):
      if os.fspath(path) == target:
        raise PermissionError(13, "Permission denied", target)
      return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse)
  status, lines = _run(capsys, dataset=f"text:{corpus}", output_dir=target)
  _assert_one_line(status, lines, target, "cannot be written (Permission denied")


def test_model_path_that_is_not_a_gguf_file(capsys, tmp_path, corpus):
  (tmp_path / "model.gguf").write_text("hello")
  status, lines = _run(capsys, model="smollm2", model_path=str(tmp_path / "model.gguf"), mode="dense",
                       dataset=f"text:{corpus}", output_dir=str(tmp_path / "out"))
  _assert_one_line(status, lines, str(tmp_path / "model.gguf"), "is not a GGUF file")


def test_hf_directory_without_config_json(capsys, tmp_path, corpus):
  (tmp_path / "llama").mkdir()
  status, lines = _run(capsys, model="llama2", model_path=str(tmp_path / "llama"), mode="dense",
                       dataset=f"text:{corpus}", output_dir=str(tmp_path / "out"))
  _assert_one_line(status, lines, "no config.json in", str(tmp_path / "llama"))


def test_block_size_8_is_refused_by_the_kernels_rule(capsys, tmp_path):
  with pytest.raises(block_config.BlockConfigError, match="power of two >= 16"):
    block_config.BlockSparseConfig(block_q=8, block_k=8)
  status, lines = _run(capsys, block_size="8", output_dir=str(tmp_path / "out"))
  _assert_one_line(status, lines, "block_q must be a power of two >= 16; got 8")


def test_kernel_errors_map_by_type_and_bugs_keep_their_traceback(capsys, tmp_path, corpus, monkeypatch):
  values = {"dataset": f"text:{corpus}", "output_dir": str(tmp_path / "out")}

  def kernel_refuses(config):
    raise block_config.BlockConfigError("backend='triton' needs a GPU\nsecond line")

  monkeypatch.setattr(pipeline, "run", kernel_refuses)
  _assert_one_line(*_run(capsys, **values), "backend='triton' needs a GPU")

  def bug(config):
    raise ValueError("not a user error")

  monkeypatch.setattr(pipeline, "run", bug)
  with pytest.raises(ValueError, match="not a user error"):
    main_lib.run_command(_TINY | values, progress=False)


# ----------------------------------------------------------------------------------------------
# Checkpoints: another block size or model, Ctrl-C while tuning, damaged files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "tune"])
def test_checkpoint_with_another_block_size(capsys, tmp_path, corpus, mode):
  _save_checkpoint(tmp_path, blocks={"block_q": 32, "block_k": 32, "causal": True})
  status, lines = _run(capsys, mode=mode, dataset=f"text:{corpus}", output_dir=str(tmp_path))
  _assert_one_line(status, lines, "found with block_q=32, block_k=32", "got block_q=16, block_k=16")


@pytest.mark.parametrize("metadata, fragment", [
    ({"num_layers": 30, "num_heads": 9, "layers_done": 30, "model_name": "smollm2"}, "num_layers=30"),
    ({"model_name": "llama2"}, "belong to model 'llama2', not 'tiny'"),
    ({"weights_hash": "0" * 64}, "same architecture, different weights"),
])
def test_eval_on_another_models_checkpoint(capsys, tmp_path, corpus, metadata, fragment):
  _save_checkpoint(tmp_path, **metadata)
  status, lines = _run(capsys, mode="eval", dataset=f"text:{corpus}", output_dir=str(tmp_path))
  _assert_one_line(status, lines, fragment)


def test_ctrl_c_while_tuning_says_what_is_saved(capsys, tmp_path, corpus, monkeypatch):
  def tune_layer(layer, evaluator, tuned, afbs_config, **kwargs):
    if layer == 1:
      raise KeyboardInterrupt
    # Layer 0 keeps its dense-equivalent row: only the bookkeeping of a finished layer is needed here.
    return model_tuning.LayerStats(layer, 0.0, 0.0, 1.0, 0.0, 0, 0, 0, 0, 0.0, 0.0, {})

  monkeypatch.setattr(model_tuning, "_tune_layer", tune_layer)
  status, lines = _run(capsys, mode="tune", dataset=f"text:{corpus}", output_dir=str(tmp_path))
  checkpoint_dir = os.path.join(str(tmp_path), "checkpoint")
  _assert_one_line(status, lines, f"1 of 2 layers saved in {checkpoint_dir}; rerun the same command to resume",
                   prefix="interrupted: ", expected_status=130)
  assert checkpoint.load_tuned(checkpoint_dir).layers_done == 1


def test_corrupt_checkpoint_prints_one_line_and_nothing_after(capsys, caplog, tmp_path, corpus, monkeypatch):
  path = _save_checkpoint(tmp_path)
  for root, _, files in os.walk(os.path.join(path, "2", "arrays")):
    for name in files:
      if os.path.basename(root) == "d":  # OCDBT's data files: every array's bytes
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(10)
  # Orbax's concurrent restore used to leave reads in flight on a closed event loop: their completions
  # reported "Event loop is closed" through sys.unraisablehook after the error line, and asyncio logged
  # "Future exception was never retrieved" when the orphaned futures were collected.
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    status, lines = _run(capsys, mode="eval", dataset=f"text:{corpus}", output_dir=str(tmp_path))
    time.sleep(0.3)  # the stray completions came within milliseconds
    gc.collect()
  _assert_one_line(status, lines, "checkpoint step 2", "is truncated or corrupt")
  assert not unraisable and not caplog.records and not capsys.readouterr().err
