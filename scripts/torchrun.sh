#!/usr/bin/env bash
# Train with DDP under torchrun, on one node or several. Arguments go to `train.py fit`; the script sets the DDP
# layout after them. Run it from anywhere with the project's environment active (torchrun on PATH).
#
# One node, all its GPUs:
#   bash scripts/torchrun.sh --config configs/imagenet/deit_300e.yaml --config configs/imagenet/biformer_tiny.yaml \
#     --data.init_args.root /data/imagenet
# Two nodes: the same command on each node, with the same RUN_NAME and the first node's address:
#   NNODES=2 RDZV_ENDPOINT=node0.example.org:29400 RUN_NAME=biformer-tiny-in1k \
#     bash scripts/torchrun.sh --config configs/imagenet/deit_300e.yaml --config configs/imagenet/biformer_tiny.yaml
#
# Environment:
#   NNODES         nodes taking part (default 1)
#   NPROC          processes (GPUs) on this node (default: every GPU nvidia-smi lists, 1 without one)
#   RDZV_ENDPOINT  host:port of the rendezvous, reachable from every node (default localhost:0, a free port, when
#                  NNODES is 1; required otherwise)
#   RUN_NAME       the run name, also the rendezvous id (required when NNODES > 1). Without it one node picks a
#                  timestamp and train.py names the run <task>-<backbone>-<timestamp>. Rerunning with the same
#                  RUN_NAME resumes from checkpoints/<RUN_NAME>/last.ckpt.
#   MAX_RESTARTS   times torchrun restarts failed workers (default 0); a restart resumes from last.ckpt
set -euo pipefail
cd "$(dirname "$0")/.."

gpu_count() {
  local count=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    count="$(nvidia-smi --list-gpus | wc -l)"
  fi
  echo "$((count > 0 ? count : 1))"
}

NNODES="${NNODES:-1}"
NPROC="${NPROC:-$(gpu_count)}"
RUN_NAME="${RUN_NAME:-}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
if [[ "${NNODES}" -gt 1 ]]; then
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node (the same on every node)}"
  : "${RUN_NAME:?set RUN_NAME (the same on every node)}"
fi
RDZV_ENDPOINT="${RDZV_ENDPOINT:-localhost:0}"
# NOTE: train.py's default run name uses the rendezvous id (TORCHELASTIC_RUN_ID), the same in every process
RDZV_ID="${RUN_NAME:-$(date +%Y%m%d-%H%M%S)}"

torchrun \
  --nnodes "${NNODES}" \
  --nproc_per_node "${NPROC}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${RDZV_ENDPOINT}" \
  --rdzv_id "${RDZV_ID}" \
  --max_restarts "${MAX_RESTARTS}" \
  train.py fit "$@" \
  ${RUN_NAME:+--name "${RUN_NAME}"} \
  --trainer.num_nodes "${NNODES}" \
  --trainer.devices "${NPROC}" \
  --trainer.strategy ddp
