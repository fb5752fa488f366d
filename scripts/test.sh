#!/usr/bin/env bash
# Set up .venv and run the checks: ruff (lint + format) and the fast test suite. Extra arguments go to pytest
# (e.g. -m slow for the slow tests, -k name to select).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
