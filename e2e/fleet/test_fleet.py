"""Three boards behind one endpoint (issue 11): three `rkllama serve` on loopback ports, LiteLLM's
proxy in front with e2e/fleet/litellm.yaml.in, and the official `openai` client sending a
bounded number of chat requests to the proxy. Run by e2e/fleet/run.sh (it installs LiteLLM in a
venv of its own); not part of .ci/run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import RkllamaServer, free_port, make_models_dir  # noqa: E402
from faults_support import wait_until  # noqa: E402
from rkllama.store.default_model import packaged_default_model  # noqa: E402

BOARD_KEY = "board-key"
PROXY_KEY = "sk-fleet-test"
CHAT = "/v1/chat/completions"
LITELLM = os.environ.get("RKLLAMA_LITELLM", "litellm")


def served(board: RkllamaServer, model: str | None = None) -> float:
    """Chat completions a board answered with 200 (all models, or tokens generated for one)."""
    with httpx.Client(base_url=board.base_url, headers={"Authorization": f"Bearer {BOARD_KEY}"}) as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if model is None and sample.name == "rkllama_http_requests_total":
                if sample.labels == {"route": CHAT, "status": "200"}:
                    return sample.value
            if model is not None and sample.name == "rkllama_generated_tokens_total":
                if sample.labels == {"model": model}:
                    return sample.value
    return 0.0


def start_board(root: Path, name: str, port: int | None = None, second: bool = False) -> RkllamaServer:
    models = root / name
    if not models.exists():
        make_models_dir(models)
        if second:
            (models / "second").mkdir()
            os.link(packaged_default_model(), models / "second" / "weights.gguf")
            (models / "second" / "Modelfile").write_text('FROM="weights.gguf"\nNUM_CTX=2048\n')
    env = {"RKLLAMA_NUM_PARALLEL": "2", "RKLLAMA_CONTEXT_LENGTH": "2048"}
    board = RkllamaServer(models, root / f"{name}.log", args=["--api-key", BOARD_KEY], env=env, port=port)
    return board.wait_ready()


@pytest.fixture
def fleet(tmp_path: Path):
    boards = {name: start_board(tmp_path, name, second=name == "c") for name in ("a", "b", "c")}
    config = (Path(__file__).parent / "litellm.yaml.in").read_text()
    for name, board in boards.items():
        config = config.replace(f"${{PORT_{name.upper()}}}", str(board.port))
    (tmp_path / "litellm.yaml").write_text(config)
    port = free_port()
    log = open(tmp_path / "litellm.log", "wb")  # noqa: SIM115 - closed below
    proxy = subprocess.Popen(
        [LITELLM, "--config", str(tmp_path / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(port)],
        # Offline: LiteLLM would otherwise fetch its model cost map from the internet at start.
        env={**os.environ, "BOARD_KEY": BOARD_KEY, "PROXY_KEY": PROXY_KEY, "LITELLM_LOG": "INFO"}
        | {"LITELLM_OFFLINE_MODE": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "true"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def proxy_ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(proxy_ready, 180), (tmp_path / "litellm.log").read_text()[-3000:]
        yield boards, f"http://127.0.0.1:{port}", tmp_path
    finally:
        os.killpg(proxy.pid, signal.SIGTERM)
        proxy.wait(30)
        log.close()
        for board in boards.values():
            board.stop()


def ask(client: openai.OpenAI, model: str, n: int) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Say hi ({n})."}], max_tokens=6, temperature=0
    )
    return reply.choices[0].message.content or ""


def send(client: openai.OpenAI, model: str, count: int, workers: int = 3) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda n: ask(client, model, n), range(count)))


def test_requests_spread_route_by_model_survive_a_dead_board_and_it_rejoins(fleet) -> None:
    boards, proxy, root = fleet
    client = openai.OpenAI(base_url=f"{proxy}/v1", api_key=PROXY_KEY, max_retries=0, timeout=180)

    # Spread: every board answers a share of the default model's requests.
    assert all(send(client, "smollm2", 18))
    shares = {name: served(board) for name, board in boards.items()}
    assert all(share > 0 for share in shares.values()), shares

    # By model: "second" is on board c only.
    assert all(send(client, "second", 3))
    assert served(boards["c"], "second") > 0
    assert served(boards["a"], "second") == 0 and served(boards["b"], "second") == 0

    # A board dies (its whole process group: server and runner); no request fails.
    dead = boards["b"]
    os.killpg(dead.process.pid, signal.SIGKILL)
    dead.process.wait(30)
    assert all(send(client, "smollm2", 12))

    # It comes back on its port and gets requests again once its cooldown (5 s) is over.
    boards["b"] = reborn = start_board(root, "b", port=dead.port)
    deadline = time.monotonic() + 90
    sent = 0
    while served(reborn) == 0 and time.monotonic() < deadline and sent < 600:
        assert all(send(client, "smollm2", 3))
        sent += 3
    assert served(reborn) > 0, f"board b got none of {sent} requests after its restart"
