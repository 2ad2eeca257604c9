#!/usr/bin/env bash
# Create the virtualenv and install the project with its test extras.
# Keep a torch the user already has: when the system python imports torch, the venv sees it
# (--system-site-packages); otherwise install the CPU wheel named by $2 (an unpinned torch would
# pull a multi-GB CUDA build).
set -euo pipefail
venv=${1:-.venv}
torch_fallback=${2:-torch==2.13.0}
if [ ! -x "$venv/bin/python" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip wheel setuptools
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "$torch_fallback"
fi
torch_now=$("$py" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
extras="dev"
if command -v mpicc >/dev/null 2>&1; then extras="dev,mpi"; fi
# Pin the installed torch so no dependency upgrades it behind the user's back.
"$py" -m pip install -q -e ".[$extras]" "torch==$torch_now"
