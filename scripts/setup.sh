#!/usr/bin/env bash
# Create .venv/ in the repo root and install sftc with everything the demo and tests need.
# Idempotent: a second call only checks. On a machine without an NVIDIA GPU, torch is pinned to
# the CPU build (a looser requirement pulls gigabytes of CUDA packages); with a GPU, bring your
# own CUDA build first or set SFTC_TORCH to the requirement you want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${SFTC_TORCH:-}" ]; then
    "${PIP[@]}" "$SFTC_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
  else
    # the CPU wheel: a local wheelhouse (find-links) or the PyTorch CPU index provides it
    "${PIP[@]}" "torch==2.13.0" || "${PIP[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if ! .venv/bin/python -c "import sftc, trl, peft, dvc, ray" 2>/dev/null || [ pyproject.toml -nt .venv/.sftc-installed ]; then
  "${PIP[@]}" -c constraints.txt -e ".[qlora,dvc,test,tracking,ray]"
  touch .venv/.sftc-installed
fi
.venv/bin/python -c "import torch, transformers, trl; print(f'sftc env ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
