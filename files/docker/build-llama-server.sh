#!/usr/bin/env bash
# Shared by every inference Dockerfile, in the build stage: build llama.cpp's own server, llama-server (the
# llama-server backend), from the llama.cpp source inside the llama-cpp-python sdist of the given version, so one
# version pin governs both backends. CMAKE_ARGS are the image's own (the same GGML_* flags as the wheel); llama.cpp
# is linked statically into the one binary, without the web UI (nothing is fetched at build time) or OpenSSL (the
# gateway in front of it terminates nothing either: it speaks plain HTTP on loopback).
# Usage: build-llama-server.sh <llama-cpp-python version> <bin dir> (pip: the venv's, which must still have it)
set -euo pipefail

version="${1:?usage: build-llama-server.sh <llama-cpp-python version> <bin dir>}"
bin_dir="${2:?usage: build-llama-server.sh <llama-cpp-python version> <bin dir>}"
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

"${bin_dir}/pip" download --no-deps --no-binary=llama-cpp-python --dest "${work}/sdist" "llama-cpp-python==${version}"
mkdir "${work}/src"
tar -xzf "${work}/sdist/llama_cpp_python-${version}.tar.gz" -C "${work}/src" --strip-components=1

# shellcheck disable=SC2086 # CMAKE_ARGS is a list of flags
cmake -S "${work}/src/vendor/llama.cpp" -B "${work}/build" -G Ninja ${CMAKE_ARGS:-} \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
cmake --build "${work}/build" --target llama-server
install -m 0755 "${work}/build/bin/llama-server" "${bin_dir}/llama-server"
"${bin_dir}/llama-server" --version
