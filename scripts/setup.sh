#!/usr/bin/env bash
# Install memtrans and what it needs into the current Python environment.
#   bash scripts/setup.sh          # runtime (+ data extras)
#   bash scripts/setup.sh dev      # + test tools
# torch is installed first and explicitly: on CPU machines the CPU build (torch==2.13.0, overridable with
# TORCH_SPEC=...), so that pip never resolves an unpinned `torch` to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP "${TORCH_SPEC:-torch}"
  else
    $PIP "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
extras="data"
[ "${1:-}" = "dev" ] && extras="data,dev"
$PIP -e ".[$extras]"
$PY -c "import torch, faiss, memtrans; print(f'memtrans {memtrans.__version__} | torch {torch.__version__} | faiss {faiss.__version__}')"
