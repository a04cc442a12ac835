# syntax=docker/dockerfile:1.7
#
# qwen-vl-serve images. Two targets from one file:
#
#   docker build --target gpu -t qwen-vl-serve:gpu .   # NVIDIA GPUs, vLLM 0.32.0 (default target)
#   docker build --target cpu -t qwen-vl-serve:cpu .   # CPU, installed by deploy/install.sh
#
#   docker run --gpus all --shm-size 8g -p 8000:8000 -v /srv/models/Qwen-VL-Chat:/models/Qwen-VL-Chat:ro \
#     -v qwenvl-cache:/cache -e QWENVL_MODEL=/models/Qwen-VL-Chat --stop-timeout 60 qwen-vl-serve:gpu
#
# Every server option is a QWENVL_* environment variable (QWENVL_MODEL, QWENVL_MAX_NUM_SEQS,
# QWENVL_API_KEY_FILE, ...; see server/settings.py) or a flag appended to `docker run`.
# Nothing secret is baked in: give API keys at run time (QWENVL_API_KEY_FILE pointing at a
# mounted secret is better than QWENVL_API_KEYS, which shows in `docker inspect`).
#
# Base images are pinned by version tag; pin them by digest too for reproducible builds
# (--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.26

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
# CPU: the very recipe `make install` runs (deploy/install.sh), so the image and a developer's
# checkout have the same packages. tests/deploy/test_dockerfile.py keeps it that way.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
WORKDIR /opt/qwen-vl-serve
COPY pyproject.toml README.md ./
COPY deploy/install.sh deploy/install.sh
COPY server/ server/
COPY clients/ clients/
# The pip cache mount keeps downloaded wheels between builds (a source change re-runs the
# install, which then only re-links them) without leaving them in any layer.
# No extras: the image carries no test tools. The font install.sh adds is a build-stage
# leftover; the runtime stage installs its own copy below.
RUN --mount=type=cache,target=/root/.cache/pip \
    QWENVL_INSTALL_EXTRAS='' PYTHON=python3.11 deploy/install.sh /opt/venv

FROM ${PYTHON_IMAGE} AS cpu
# libnuma1: vLLM's CPU kernels link against it. tini: a real PID 1 that forwards SIGTERM to
# the server and reaps the engine's child processes.
# Debian package versions are not pinned (DL3008): the security archive replaces them, so a
# pin breaks the build within weeks; the base image tag is what pins the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 tini fonts-wqy-microhei \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid so that Kubernetes' runAsNonRoot can check it and volume permissions
# can be set for it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/qwenvl qwenvl \
    && mkdir -p /models /cache \
    && chown qwenvl:qwenvl /models /cache
# install.sh installs the project editable, so the source stays at the path it was built in.
COPY --from=cpu-build /opt/qwen-vl-serve /opt/qwen-vl-serve
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/qwenvl \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    QWENVL_TINY_MODEL_DIR=/cache/qwen-vl-serve/tiny \
    QWENVL_HOST=0.0.0.0 \
    QWENVL_PORT=8000
# /models: checkpoints, mounted read-only. /cache: hub downloads, compile caches, the demo
# checkpoint; a persistent volume here makes restarts faster.
VOLUME ["/models", "/cache"]
EXPOSE 8000
USER 10001:10001
# /health is liveness (200 while loading too); readiness is /ready, used by load balancers.
# qwen-vl-healthcheck asks the address the server listens on, from the server's own command
# line and environment (--port or --host after the image name included), with a key when
# --auth-health-endpoints asks for one. It is a Python process (about 1 s of CPU to start)
# whose own request times out at 4 s: --timeout leaves it room on a CPU-starved container.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["qwen-vl-healthcheck"]
ENTRYPOINT ["tini", "--", "qwen-vl-serve"]

# ---------------------------------------------------------------------------------------------
# GPU: vLLM 0.32.0 with PyPI's CUDA 13.0 torch on the matching NVIDIA CUDA runtime image.
# Ubuntu 24.04 ships Python 3.12 and the project needs 3.11, so the interpreter is a
# relocatable standalone CPython installed by uv (pinned below).
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
ARG PYTHON_VERSION=3.11.14
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/ clients/
# EXTRAS: the project's optional dependency groups; multi-node serving over Ray needs Ray in
# the image as well (deploy/README.md, "Several nodes").
ARG EXTRAS=gpu
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /opt/venv/bin/python "/src[${EXTRAS}]"

FROM ${CUDA_IMAGE} AS gpu
# gcc and libc6-dev: Triton (used by vLLM's kernels) compiles a small C launcher the first
# time it runs on a machine and fails without a C compiler. tini: see the cpu stage.
# Versions not pinned (DL3008): see the cpu stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev tini fonts-wqy-microhei \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/qwenvl qwenvl \
    && mkdir -p /models /cache \
    && chown qwenvl:qwenvl /models /cache
COPY --from=gpu-build /opt/python /opt/python
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/qwenvl \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    QWENVL_TINY_MODEL_DIR=/cache/qwen-vl-serve/tiny \
    QWENVL_HOST=0.0.0.0 \
    QWENVL_PORT=8000
VOLUME ["/models", "/cache"]
EXPOSE 8000
USER 10001:10001
# Loading a 10 B model and capturing CUDA graphs takes minutes; the start period keeps those
# minutes from counting as failures (/health answers 200 while loading anyway).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["qwen-vl-healthcheck"]
ENTRYPOINT ["tini", "--", "qwen-vl-serve"]
