#!/usr/bin/env bash
# Three rkllama boards behind LiteLLM's proxy, end to end (docs/fleet.md):
#
#     bash e2e/fleet/run.sh
#
# Installs LiteLLM's proxy (PyPI litellm[proxy]) in a venv of its own (~/.cache/rkllama-e2e/litellm,
# reused), since its pins are its own, then runs e2e/fleet/test_fleet.py with this checkout's .venv
# (scripts/setup.sh --test makes it). A few minutes on 2 cores; not part of .ci/run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${LITELLM_VENV:-$HOME/.cache/rkllama-e2e/litellm}
if [[ ! -x "$venv/bin/litellm" ]]; then
  echo "Installing litellm[proxy] into $venv ..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "litellm[proxy]"
fi
[[ -x "$repo/.venv/bin/python" ]] || bash "$repo/scripts/setup.sh" --test
cd "$repo"
RKLLAMA_LITELLM="$venv/bin/litellm" exec .venv/bin/python -m pytest -p no:cacheprovider -v e2e/fleet "$@"
