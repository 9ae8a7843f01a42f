"""The CPU settings reach the runner: NUM_THREAD (Modelfile) over RKLLAMA_NUM_THREAD (env),
and the OpenMP wait policy (RKLLAMA_WAIT_POLICY). /api/ps and the runner log report what is in
force (docs/performance.md)."""

from __future__ import annotations

from test_native_api import model_folder


def loaded_settings(client) -> list[tuple[str, int, int]]:
    """(name, num_thread, num_parallel) of each loaded model, from the Ollama /api/ps reply
    (the fields are ours, which the official client drops, so read the JSON itself)."""
    models = client.get("/api/ps").json()["models"]
    return [(m["name"].split(":")[0], m["num_thread"], m["num_parallel"]) for m in models]


def test_num_thread_from_the_modelfile_or_the_environment_is_reported_by_api_ps(start_server, tmp_path):
    models = tmp_path / "models"
    model_folder(models, "one-thread", 'FROM="weights.gguf"\nNUM_THREAD=1\nNUM_PARALLEL=1\n')
    model_folder(models, "from-env", 'FROM="weights.gguf"\n')
    model_folder(models, "bad", 'FROM="weights.gguf"\nNUM_THREAD=0\n')
    srv = start_server(models_dir=models, args=["--no-default"], env={"RKLLAMA_NUM_THREAD": "3"}, expect_model=False)
    with srv.client() as client:
        assert client.post("/load_model", json={"model_name": "one-thread"}).status_code == 200
        assert loaded_settings(client) == [("one-thread", 1, 1)]
        assert client.post("/unload_model").status_code == 200
        assert client.post("/load_model", json={"model_name": "from-env"}).status_code == 200
        assert loaded_settings(client) == [("from-env", 3, 4)]
        assert client.post("/unload_model").status_code == 200
        bad = client.post("/load_model", json={"model_name": "bad"})
        assert bad.status_code == 400
        assert "NUM_THREAD must be at least 1, got 0" in bad.json()["error"]
    # The default wait: brief for a one-at-a-time runner, spinning for the batch decoder's.
    assert "llama.cpp engine: 1 threads, GOMP_SPINCOUNT=300\n" in srv.log()
    assert "llama.cpp engine: 3 threads, GOMP_SPINCOUNT=300000\n" in srv.log()


def test_wait_policy_from_the_environment_reaches_the_runner_and_a_bad_one_is_refused(start_server, tmp_path):
    brief = start_server(env={"RKLLAMA_WAIT_POLICY": "brief"})
    assert "threads, GOMP_SPINCOUNT=300\n" in brief.log()
    active = start_server(env={"RKLLAMA_WAIT_POLICY": "active"})
    assert "threads, OMP_WAIT_POLICY=active" in active.log()
    passive = start_server(env={"RKLLAMA_WAIT_POLICY": "passive"})
    assert "threads, OMP_WAIT_POLICY=passive" in passive.log()
    models = tmp_path / "models"
    model_folder(models, "tiny", 'FROM="weights.gguf"\n')
    srv = start_server(
        models_dir=models, args=["--no-default"], env={"RKLLAMA_WAIT_POLICY": "lazy"}, expect_model=False
    )
    with srv.client() as client:
        refused = client.post("/load_model", json={"model_name": "tiny"})
        assert refused.status_code == 400
        message = "RKLLAMA_WAIT_POLICY must be one of 'active', 'auto', 'brief', 'passive', 'spin', got 'lazy'"
        assert message in refused.json()["error"]
