#!/usr/bin/env bash
# Set up e5v on a fresh machine, in a virtual environment in .venv:
#   bash scripts/setup.sh          the runtime: torch pinned first (an unpinned torch would pull a multi-GB CUDA
#                                  build on a CPU machine), then e5v and its dependencies
#   bash scripts/setup.sh --test   the runtime and the test set: pytest, httpx, ruff, and DeepSpeed, MTEB,
#                                  TensorBoard, Lance and DuckDB (their integrations are tested for real)
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0
case "${1:-}" in
  "") ;;
  --test) TEST=1 ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
# System packages: Liberation Sans (metric-compatible with Arial, the official caption-rendering font) and, for
# the test set, headless Chromium (the search page's browser test). Installed when missing and apt is usable (root).
SYSTEM_PACKAGES="fonts-liberation"
[ "$TEST" = 1 ] && SYSTEM_PACKAGES="$SYSTEM_PACKAGES chromium"
missing=$(for p in $SYSTEM_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    for attempt in 1 2; do  # a registry hiccup gets one retry; then the features (and tests) that need these say so
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null \
        && break || { echo "warning: apt-get could not install: $missing (attempt $attempt)" >&2; sleep 5; }
    done
  else
    echo "note: install these system packages (fonts-liberation: caption rendering; chromium: the browser test): $missing" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if [ "$TEST" = 1 ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/python -c "import e5v, torch, transformers; print(f'e5v {e5v.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
