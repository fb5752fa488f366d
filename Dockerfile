# Strata's GPU image: train.py on the official PyTorch CUDA runtime image.
#
#   docker build --build-arg USER_UID="$(id -u)" --build-arg USER_GID="$(id -g)" -t strata .
#   docker run --rm --gpus all --ipc=host --init -v "$PWD/data:/data" -v "$PWD/checkpoints:/workspace/checkpoints" \
#     -e WANDB_API_KEY strata fit --config configs/demo/classify.yaml
#
# scripts/docker_run.sh does both; docs/cluster.md explains the volumes, wandb and multi-GPU runs.

# NOTE: torch 2.14.1 + CUDA 13.0 is the build the project is tested with (2.14.1+cu130, torchvision 0.29.1). This
# image ships Ubuntu 24.04's system Python (PEP 668), hence PIP_BREAK_SYSTEM_PACKAGES: the image is the environment.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /workspace

# Dependencies first, from pyproject.toml alone, so this layer is rebuilt only when they change. The constraint keeps
# the image's own torch build (pip never swaps it for another one from PyPI).
ARG TORCHVISION_VERSION=0.29.1
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > constraints.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt "torchvision==${TORCHVISION_VERSION}" \
    && rm requirements.txt constraints.txt

# A non-root user; build with your own uid/gid so files written to bind mounts are yours. --non-unique: Ubuntu 24.04
# already has uid/gid 1000 (user "ubuntu"). /workspace/data points at the /data volume, so the configs' relative
# data/... roots (the demo's data/demo/...) and absolute /data/... roots name the same place.
ARG USER_UID=1000
ARG USER_GID=1000
RUN groupadd --non-unique --gid "${USER_GID}" strata \
    && useradd --no-log-init --non-unique --create-home --uid "${USER_UID}" --gid "${USER_GID}" strata \
    && mkdir -p /data /workspace/checkpoints \
    && ln -s /data /workspace/data \
    && chown strata:strata /data /workspace/checkpoints

# Then the source, installed without dependencies (they are in the layer above).
COPY core/ core/
COPY blocks/ blocks/
COPY backbones/ backbones/
COPY datamodules/ datamodules/
COPY tasks/ tasks/
COPY visualization/ visualization/
COPY runs/ runs/
COPY configs/ configs/
COPY README.md train.py ./
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build strata.egg-info

USER ${USER_UID}:${USER_GID}
VOLUME ["/data", "/workspace/checkpoints"]

# `docker run IMAGE fit --config ...` runs `python train.py fit --config ...`; wandb logs online only when
# WANDB_API_KEY is passed (-e WANDB_API_KEY), offline into the run directory otherwise (runs/loggers.py).
ENTRYPOINT ["python", "train.py"]
CMD ["--help"]
