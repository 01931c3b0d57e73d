#!/usr/bin/env bash
# Run ansible-test sanity on a copy of the collection laid out as ansible_collections/llmpods/inference.
# ansible-test bootstraps pip in its sanity virtual environments with a get-pip script downloaded from
# ansible's CI servers; where only PyPI is reachable, a stand-in installs pip from a wheel downloaded from PyPI.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv_bin="$root/.venv/bin"
pip_version=24.2
cache="$HOME/.ansible/test/cache"
standin="$cache/get_pip_${pip_version//./_}.py"
wheel_dir="$cache/pip-wheel"

mkdir -p "$cache" "$wheel_dir"
if ! ls "$wheel_dir"/pip-"$pip_version"-*.whl >/dev/null 2>&1; then
  "$venv_bin/pip" download --quiet --no-deps --only-binary=:all: -d "$wheel_dir" "pip==$pip_version"
fi
pip_wheel="$(ls "$wheel_dir"/pip-"$pip_version"-*.whl)"
sed "s|@PIP_WHEEL@|$pip_wheel|" "$root/.ci/get_pip_standin.py" >"$standin"

work="$root/.build/sanity/ansible_collections/llmpods/inference"
mkdir -p "$work"
rsync -a --delete \
  --exclude .venv --exclude .build --exclude .llmpods --exclude .git --exclude .gpu \
  --exclude .pytest_cache --exclude .ruff_cache --exclude __pycache__ --exclude tests/output \
  "$root/" "$work/"
cd "$work"
git init -q . 2>/dev/null || true
git add -A >/dev/null 2>&1 || true
export PATH="$venv_bin:$PATH"
ansible-test sanity --python 3.11 --requirements --color no "$@"
