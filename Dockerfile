# movierec in a container: the CPU image by default; a build argument selects a CUDA base for GPU machines.
#
#   docker build -t movierec:cpu .
#   docker build -t movierec:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04 --build-arg TORCH_INDEX_URL= .
#
# The install step is the README's: `make` creates .venv and runs `pip install -e '.[dev]'` (the Makefile's
# .venv/bin/movierec target). Images are not built in CI; tests/test_deploy.py checks this file and
# docker-compose.yml against the real command-line parser.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# PyPI's torch==2.13.0 for Linux is the CUDA build (several GB). The CPU image installs the same release's
# CPU build from PyTorch's index; for a CUDA image pass an empty TORCH_INDEX_URL (PyPI's CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

# make for the install target; python3.11 itself where the base image lacks it (Ubuntu-based CUDA images)
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
        $(command -v python3.11 >/dev/null || echo python3.11 python3.11-venv) \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && make .venv/bin/movierec

# the named volumes of docker-compose.yml are created from these folders, owned by the unprivileged user
RUN useradd --create-home --uid 1000 movierec \
    && mkdir -p /data /runs /mlflow \
    && chown movierec:movierec /data /runs /mlflow
USER movierec
ENV PATH=/app/.venv/bin:$PATH \
    MOVIEREC_DATA_HOME=/data/downloads

CMD ["movierec", "--help"]
