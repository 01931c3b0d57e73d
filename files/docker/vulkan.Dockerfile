# llmpods inference image, Vulkan target: llama-cpp-python built with the Vulkan backend.
# Build it with the inference_image role, which stages the build context (this directory plus an
# optional CA bundle under build-ca/ for reaching the package index from inside the build).
ARG BASE_IMAGE=debian:bookworm-slim
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ARG PROMETHEUS_CLIENT_VERSION=0.26.0

# ---- build: compile the llama-cpp-python wheel and install it, with its server extra, into a venv
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential ca-certificates cmake ninja-build pkg-config python3 python3-venv \
      libvulkan-dev glslc \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/llmpods

# An optional CA bundle for the package index, kept apart from the image's own trust store.
COPY build-ca/ /opt/build-ca/

ARG LLAMA_CPP_PYTHON_VERSION
ARG CMAKE_ARGS="-DGGML_VULKAN=ON -DGGML_NATIVE=OFF"
ENV CMAKE_ARGS="${CMAKE_ARGS}" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Both backends from one llama-cpp-python sdist, llama.cpp compiled once: the wheel (installed with its server
# extra) and llama.cpp's own llama-server, with the same CMake flags (the same step for every target; see the script).
COPY build-llama-cpp.sh /usr/local/bin/
RUN if [ -s /opt/build-ca/ca-bundle.crt ]; then export PIP_CERT=/opt/build-ca/ca-bundle.crt; fi \
 && build-llama-cpp.sh "${LLAMA_CPP_PYTHON_VERSION}" /opt/llmpods /wheels

# /metrics of the llama-cpp-python backend.
ARG PROMETHEUS_CLIENT_VERSION
RUN if [ -s /opt/build-ca/ca-bundle.crt ]; then export PIP_CERT=/opt/build-ca/ca-bundle.crt; fi \
 && /opt/llmpods/bin/pip install "prometheus-client==${PROMETHEUS_CLIENT_VERSION}"

# Keep what the server imports (the same step for every target; see the script).
COPY strip-venv.sh /usr/local/bin/
RUN strip-venv.sh /opt/llmpods

# ---- runtime: the Vulkan loader and drivers, the interpreter and the venv
FROM ${BASE_IMAGE} AS runtime
ARG LLAMA_CPP_PYTHON_VERSION

LABEL org.opencontainers.image.title="llmpods inference (vulkan)" \
      org.opencontainers.image.description="llama-cpp-python (with a chat-aware token count) and llama-server OpenAI-compatible servers, Vulkan build" \
      org.opencontainers.image.version="${LLAMA_CPP_PYTHON_VERSION}" \
      org.opencontainers.image.source="https://github.com/llmpods/inference" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="llmpods"

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libvulkan1 mesa-vulkan-drivers python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 llmpods \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin llmpods

COPY --from=build /opt/llmpods /opt/llmpods
COPY llmpods_server/*.py /opt/llmpods/app/llmpods_server/

ENV PATH=/opt/llmpods/bin:${PATH} \
    PYTHONPATH=/opt/llmpods/app \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    INTERRUPT_REQUESTS=false \
    N_GPU_LAYERS=-1

USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "llmpods_server"]
