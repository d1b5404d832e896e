#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with torch pinned first (an unpinned
# torch would pull a multi-GB CUDA build on a CPU machine), then e5v and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import e5v, torch, transformers; print(f'e5v {e5v.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
