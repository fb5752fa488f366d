#!/usr/bin/env bash
# Set up .venv and run the demo: generate the synthetic shapes dataset (first use only) and train a classifier
# on it from the command line. Extra arguments go to train.py (e.g. --name my-run --trainer.max_epochs 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python train.py fit --config configs/demo/classify.yaml "$@"
