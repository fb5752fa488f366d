#!/usr/bin/env bash
# Build the image and train in it on every GPU of this machine. Arguments go to `train.py fit`:
#   bash scripts/docker_run.sh --config configs/demo/classify.yaml
#   WANDB_API_KEY=... DATA_DIR=/datasets bash scripts/docker_run.sh --config configs/imagenet/deit_300e.yaml \
#     --config configs/imagenet/biformer_tiny.yaml --data.init_args.root /data/imagenet --trainer.num_nodes 1
#
# Environment:
#   IMAGE           image tag (default strata)
#   DATA_DIR        host folder mounted at /data, the data root (default ./data, where the demo data live)
#   CHECKPOINT_DIR  host folder mounted at /workspace/checkpoints, the runs (default ./checkpoints)
#   WANDB_API_KEY   passed through when set: wandb logs online; offline into the run directory otherwise
# The image is built with your uid/gid, so the runs it writes into CHECKPOINT_DIR are yours.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-strata}"
DATA_DIR="$(realpath -m "${DATA_DIR:-data}")"
CHECKPOINT_DIR="$(realpath -m "${CHECKPOINT_DIR:-checkpoints}")"
mkdir -p "${DATA_DIR}" "${CHECKPOINT_DIR}"

docker build --build-arg USER_UID="$(id -u)" --build-arg USER_GID="$(id -g)" --tag "${IMAGE}" .

# --ipc=host: DataLoader workers share batches through /dev/shm, which Docker otherwise caps at 64 MB.
# --init: a minimal init as PID 1 forwards `docker stop`'s SIGTERM, so the run stops cleanly and saves last.ckpt.
docker run --rm --gpus all --ipc=host --init \
  --volume "${DATA_DIR}:/data" \
  --volume "${CHECKPOINT_DIR}:/workspace/checkpoints" \
  --env WANDB_API_KEY \
  "${IMAGE}" fit "$@"
