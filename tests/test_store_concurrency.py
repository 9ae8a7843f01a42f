"""Listing the models while other clients copy and delete them: a model that vanishes
mid-listing is left out of that listing, never a 500."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx

# A tiny stand-in model file: listing and copying never load it.
TINY = b"GGUF" + bytes(4096)
ROUNDS = 30  # copy + delete per writer
WRITERS = 2
READERS = 3


def _tiny_models_dir(root: Path) -> Path:
    folder = root / "tiny"
    folder.mkdir(parents=True)
    (folder / "tiny.gguf").write_bytes(TINY)
    (folder / "Modelfile").write_text('FROM="tiny.gguf"\n')
    return root


def test_listings_beside_copies_and_deletes_never_fail(start_server, tmp_path: Path) -> None:
    srv = start_server(models_dir=_tiny_models_dir(tmp_path / "models"), args=["--no-default"], expect_model=False)
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    guard = threading.Lock()
    writers_done = threading.Event()

    def record(what: str, response: httpx.Response) -> None:
        with guard:
            statuses[(what, response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(f"{what}: {response.status_code} {response.text[:200]}")

    def writer(index: int) -> None:
        with srv.client() as client:
            for round_ in range(ROUNDS):
                name = f"copy-{index}-{round_}"
                record("copy", client.post("/api/copy", json={"source": "tiny", "destination": name}))
                if round_ % 2:
                    record("delete", client.request("DELETE", "/api/delete", json={"model": name}))
                else:
                    record("rm", client.post("/rm", json={"model": name}))

    def reader() -> None:
        with srv.client() as client:
            # Bounded by the writers' rounds: each reader lists until they are done, at least once.
            while True:
                for path in ("/api/tags", "/v1/models", "/models"):
                    record(path, client.get(path))
                if writers_done.is_set():
                    return

    readers = [threading.Thread(target=reader) for _ in range(READERS)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join(300)
    writers_done.set()
    for thread in readers:
        thread.join(300)

    assert failures == []
    assert statuses[("copy", 200)] == WRITERS * ROUNDS
    assert statuses[("delete", 200)] + statuses[("rm", 200)] == WRITERS * ROUNDS
    assert statuses[("/api/tags", 200)] >= READERS
    with srv.client() as client:
        assert client.get("/models").json() == {"models": ["tiny"]}
    assert sorted(p.name for p in srv.models_dir.iterdir() if not p.name.startswith(".")) == ["tiny"]
