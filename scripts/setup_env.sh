#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it, editable, with the test/lint tools.
# Usage: source-free; run as `bash scripts/setup_env.sh`. Re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# NOTE: torch/torchvision first, pinned to the releases this project is tested with.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[dev]"
