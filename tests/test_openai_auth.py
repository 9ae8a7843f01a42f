"""The optional API key (--api-key): every route but `GET /` needs `Authorization: Bearer <key>`,
in each dialect's error shape. Clients: the official `openai` and `ollama` packages; the
route-by-route check is in test_security.py."""

from __future__ import annotations

import ollama
import openai
import pytest

KEY = "test-key-7f3a"


def test_api_key_guards_every_dialect(start_server) -> None:
    srv = start_server(args=["--api-key", KEY])

    for wrong in ("x", KEY + "x"):
        refused = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            refused.models.list()
        assert error.value.status_code == 401
        assert error.value.body["type"] == "authentication_error" and error.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            refused.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}])

    allowed = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in allowed.models.list()] == ["SmolLM2-135M-Instruct"]
    reply = allowed.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.usage.completion_tokens == 2

    with pytest.raises(ollama.ResponseError) as denied:
        ollama.Client(host=srv.base_url).list()
    assert denied.value.status_code == 401 and "API key" in denied.value.error
    keyed = ollama.Client(host=srv.base_url, headers={"Authorization": f"Bearer {KEY}"})
    assert [m.model for m in keyed.list().models] == ["SmolLM2-135M-Instruct:latest"]

    with srv.client() as http:
        assert http.get("/").status_code == 200
        assert http.head("/").status_code == 200
        missing = {"error": "Missing API key: send the header 'Authorization: Bearer <key>'."}
        assert http.get("/models").status_code == 401 and http.get("/models").json() == missing
        assert http.get("/current_model").json() == missing
        keyed_current = http.get("/current_model", headers={"Authorization": f"Bearer {KEY}"})
        assert keyed_current.json() == {"model_name": "SmolLM2-135M-Instruct"}
