#!/usr/bin/env bash
# Shared by every inference Dockerfile, in the build stage, after llama-cpp-python is installed into the venv:
# keep what the server imports. Drops the CMake install tree the wheel carries (headers, a second copy of the
# libraries), pip and setuptools, and makes the wheel's copied library aliases symlinks again.
# Usage: strip-venv.sh <venv>
set -euo pipefail

venv="${1:?usage: strip-venv.sh <venv>}"
site="$(echo "${venv}"/lib/python3*/site-packages)"
[ -d "${site}/llama_cpp" ] || { echo "strip-venv.sh: no llama_cpp under ${site}" >&2; exit 1; }

rm -rf "${site:?}/lib" "${site:?}/include" "${site:?}"/pip "${site:?}"/pip-* "${site:?}"/setuptools \
  "${site:?}"/setuptools-* "${site:?}/_distutils_hack" "${site:?}/distutils-precedence.pth" "${venv:?}"/bin/pip*

for lib in "${site}"/llama_cpp/lib/*.so.*.*.*; do
  [ -e "${lib}" ] || continue
  ln -sf "$(basename "${lib}")" "${lib%.*.*}"
  ln -sf "$(basename "${lib}")" "${lib%%.so.*}.so"
done
