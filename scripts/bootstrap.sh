#!/usr/bin/env bash
# Create .venv at the repository root and install lorasuite with its test extras.
# PyTorch: the CPU build (torch==2.13.0) where no CUDA driver is present, the default
# (CUDA) build otherwise. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[bootstrap] CUDA driver found: installing the default torch build"
    .venv/bin/python -m pip install --quiet "torch>=2.4"
  else
    echo "[bootstrap] no CUDA: installing the CPU build torch==2.13.0"
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
  fi
fi
echo "[bootstrap] installing lorasuite and its dependencies"
.venv/bin/python -m pip install --quiet -e ".[test,ray]"
# the BFCL data files only (read as JSON by lorasuite_core/training/skills/bfcl.py): without its pinned
# dependencies (numpy==1.26.4, filelock==3.20.0, model-provider clients), which would clash with ours
.venv/bin/python -m pip install --quiet --no-deps "bfcl-eval==2026.3.23"
touch .venv/.lorasuite-installed
echo "[bootstrap] done: .venv/bin/lorasuite"
