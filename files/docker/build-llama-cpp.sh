#!/usr/bin/env bash
# Shared by every inference Dockerfile, in the build stage: build both backends from one llama-cpp-python sdist,
# compiling llama.cpp once. The llama-cpp-python wheel is built from the sdist with its CMake tree kept; that tree
# is then configured again with llama.cpp's server on and builds only llama-server (the llama-server backend),
# which links against the same llama.cpp and ggml libraries the wheel ships. So one version pin and one set of
# CMake flags (CMAKE_ARGS, the image's own GGML_* flags) govern both backends. llama-server goes into the venv's
# bin and finds those libraries in the wheel's library directory (its run path), where the libraries of its own
# that the wheel lacks go too. No web UI (nothing is fetched at build time) and no OpenSSL (the gateway in front
# of it speaks plain HTTP on loopback).
# Usage: build-llama-cpp.sh <llama-cpp-python version> <venv> <wheel dir> (the venv must have pip)
set -euo pipefail

usage="usage: build-llama-cpp.sh <llama-cpp-python version> <venv> <wheel dir>"
version="${1:?${usage}}"
venv="${2:?${usage}}"
wheels="${3:?${usage}}"
work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

"${venv}/bin/pip" download --no-deps --no-binary=llama-cpp-python --dest "${work}/sdist" "llama-cpp-python==${version}"
mkdir "${work}/src"
tar -xzf "${work}/sdist/llama_cpp_python-${version}.tar.gz" -C "${work}/src" --strip-components=1

# The wheel (and the Python server on top of it), from the unpacked sdist, keeping its CMake tree.
"${venv}/bin/pip" wheel --no-deps --wheel-dir "${wheels}" --config-settings=build-dir="${work}/build" "${work}/src"
"${venv}/bin/pip" install "${wheels}/llama_cpp_python-${version}-"*.whl "llama-cpp-python[server]==${version}"

# The same tree with the server on. The wheel builds the multimodal library from outside llama.cpp's tools
# (LLAVA_BUILD); llama.cpp's tools tree builds it itself, so that copy is turned off. Everything else the server
# links against is already built with unchanged flags: only the server's own sources (and that library) compile.
# Its run path reaches the wheel's library directory from the venv's bin.
lib_dir="$(echo "${venv}"/lib/python3*/site-packages/llama_cpp/lib)"
[ -d "${lib_dir}" ] || { echo "build-llama-cpp.sh: no llama_cpp/lib in ${venv}" >&2; exit 1; }
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader
run_path='$ORIGIN/'"$(realpath --relative-to="${venv}/bin" "${lib_dir}")"
cmake -S "${work}/src" -B "${work}/build" -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON "-DCMAKE_BUILD_RPATH=${run_path}"
cmake --build "${work}/build" --target llama-server

install -m 0755 "${work}/build/bin/llama-server" "${venv}/bin/llama-server"
# The libraries it needs that the wheel does not ship (its own server and common code), from the build tree.
for _ in 1 2 3 4 5; do
  copied=0
  while read -r soname; do
    if [ -e "${work}/build/bin/${soname}" ]; then
      cp -L "${work}/build/bin/${soname}" "${lib_dir}/${soname}"
      copied=1
    fi
  done < <(ldd "${venv}/bin/llama-server" | sed -n 's/^[[:space:]]*\([^[:space:]]*\) => not found$/\1/p')
  [ "${copied}" -eq 1 ] || break
done
"${venv}/bin/llama-server" --version
