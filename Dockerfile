# syntax=docker/dockerfile:1
# protoserve image: one image, two roles (model server, translator sidecar), chosen by PROTOSERVE_ROLE.
#   CPU:  docker build -t protoserve:cpu --build-arg VARIANT=cpu --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index> .
#   CUDA: docker build -t protoserve:cuda --build-arg VARIANT=cuda .
# PyPI's Linux torch wheels carry their CUDA libraries, so the CUDA image needs no CUDA base image:
# the node's NVIDIA container runtime provides the driver. No weights are baked in: mount a volume
# at /models and list its folders in PROTOSERVE_MODELS, or set PROTOSERVE_FETCH_DEMO=1 (and no
# PROTOSERVE_MODELS) to fetch the demo models into $PROTOSERVE_CACHE_DIR at start and serve them.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
WORKDIR /src
RUN python -m venv /opt/protoserve
ENV PATH=/opt/protoserve/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if [ "$VARIANT" = "cpu" ] && [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    else \
      pip install "torch==${TORCH_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY client ./client
COPY server ./server
COPY translator ./translator
COPY scripts/container-entrypoint.sh ./scripts/container-entrypoint.sh
# The project itself: its dependencies are pinned by ranges in pyproject.toml.
# hadolint ignore=DL3013
RUN EXTRAS="server,translator"; if [ "$VARIANT" = "cuda" ]; then EXTRAS="$EXTRAS,quant"; fi; \
    pip install ".[${EXTRAS}]" "torch==${TORCH_VERSION}"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="protoserve" \
      org.opencontainers.image.description="transformers models over gRPC, with an OpenAI-compatible translator"
RUN groupadd --system --gid 10001 protoserve \
    && useradd --system --uid 10001 --gid protoserve --home-dir /home/protoserve --create-home protoserve \
    && mkdir -p /models /run/protoserve \
    && chown protoserve:protoserve /models /run/protoserve
COPY --from=build /opt/protoserve /opt/protoserve
COPY --from=build --chmod=0755 /src/scripts/container-entrypoint.sh /usr/local/bin/protoserve-entrypoint
# The root filesystem is read-only in the pod: every cache lives on the models volume. HF_HOME there
# also lets hub ids resolve from a hub cache copied to /models/huggingface/hub. The slim image has no
# C++ compiler, so the CPU kernels (server/engine/cpu_kernels.py) are not built in it and the server
# logs so and uses torch's ops; an image that adds g++ builds them on first start, into the volume.
ENV PATH=/opt/protoserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/models/huggingface \
    PROTOSERVE_CACHE_DIR=/models/cache \
    PROTOSERVE_KERNEL_CACHE_DIR=/models/cache/kernels
USER 10001:10001
WORKDIR /home/protoserve
EXPOSE 50051 8000 9090
ENTRYPOINT ["/usr/local/bin/protoserve-entrypoint"]
