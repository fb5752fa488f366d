#!/usr/bin/env bash
# Set up .venv and run the cluster fault matrix (scripts/fault_matrix.py): every fault case once, then a table of
# case, expected, observed, pass. Extra arguments go to fault_matrix.py (e.g. -k ddp).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/fault_matrix.py "$@"
