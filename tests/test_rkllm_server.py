"""The rkllm engine end to end: the real server runs `.rkllm` models on the C test double
(tests/rkllm_double), which echoes its input back word by word."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import ollama
import pytest

from conftest import make_models_dir
from rkllama.store.default_model import DEFAULT_MODEL_NAME
from rkllm_support import double_env, log_lines, rkllm_doubles, rkllm_models_dir

__all__ = ["rkllm_doubles"]  # the fixture, imported for pytest

MODEL = "tiny.rkllm"
ECHO = "hello wörld again"  # "ö" arrives split across a WAITING callback


def generate(client: httpx.Client, messages, **body) -> httpx.Response:
    return client.post("/generate", json={"stream": False, "messages": messages, **body})


def stream_chunks(client: httpx.Client, messages, **body) -> list[dict]:
    with client.stream("POST", "/generate", json={"stream": True, "messages": messages, **body}) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    return [json.loads(part) for part in raw.split("\n\n") if part]


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["content"]


def wait_for_line(log: Path, needle: str, timeout: float = 20.0) -> list[str]:
    """Poll the double's log until a line contains `needle` (not a timing assert: a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log_lines(log)
        if any(needle in line for line in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in the double's log:\n" + "\n".join(log_lines(log)))


@pytest.fixture
def rkllm_server(start_server, tmp_path, rkllm_doubles):
    """start(abi="1.3", models=[MODEL], load=MODEL, **env) -> (server, double log)."""

    def start(abi: str = "1.3", models: tuple[str, ...] = (MODEL,), load: str | None = MODEL, **env: str):
        models_dir = rkllm_models_dir(tmp_path / "models", *models)
        log = tmp_path / "double.log"
        args = ["--no-default"] + (["--model", load] if load else [])
        srv = start_server(
            models_dir=models_dir, args=args, env=double_env(rkllm_doubles[abi], log, **env), expect_model=bool(load)
        )
        return srv, log

    return start


def test_rkllm_model_is_listed_loaded_and_answers(rkllm_server):
    # A slow NPU: callbacks further apart than the runner's stream batching window (40 ms)
    # reach the client one by one.
    srv, log = rkllm_server(load=None, RKLLM_DOUBLE_DELAY_MS="80")
    with srv.client() as client:
        assert MODEL in client.get("/models").json()["models"]
        loaded = client.post("/load_model", json={"model_name": MODEL})
        assert loaded.status_code == 200, loaded.text
        assert client.get("/current_model").json() == {"model_name": MODEL}

        answer = generate(client, ECHO)
        assert content(answer) == ECHO
        body = answer.json()
        assert body["choices"][0]["finish_reason"] == "stop"
        # 3 words in; 4 tokens out (the split character took a WAITING token), from the perf stats.
        assert {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "total_tokens": 7,
        }

        chunks = stream_chunks(client, ECHO)
    pieces = [c["choices"][0]["content"] for c in chunks]
    assert "".join(pieces) == ECHO
    assert [p for p in pieces if p] == ["hello", " wörld", " again"]  # streamed as the callbacks came
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    init = next(line for line in log_lines(log) if line.startswith("init abi="))
    assert "max_context_len=4096" in init and "max_new_tokens=2048" in init


@pytest.mark.parametrize("abi", ["1.1", "1.2.0", "1.2", "1.3"])
def test_every_runtime_abi_generates_and_stops_at_max_tokens(rkllm_server, abi):
    srv, log = rkllm_server(abi=abi)
    with srv.client() as client:
        assert content(generate(client, "one two three")) == "one two three"
        assert content(generate(client, ECHO)) == ECHO  # whole characters only, whatever the ABI
        limited = generate(client, "one two three four five", max_tokens=2)
        assert content(limited) == "one two"
        assert limited.json()["choices"][0]["finish_reason"] == "length"
        assert limited.json()["usage"]["completion_tokens"] == 2
        usage = generate(client, "one two three").json()["usage"]
        # Embeddings: the last token's hidden state (RKLLM_INFER_GET_LAST_HIDDEN_LAYER).
        embedded = client.post("/api/embed", json={"model": MODEL, "input": ["one two", "one two", "three"]})
        assert embedded.status_code == 200, embedded.text
        vectors = embedded.json()["embeddings"]
        assert len(vectors) == 3 and len(vectors[0]) == 8
        assert vectors[0] == vectors[1] != vectors[2]
        assert embedded.json()["prompt_eval_count"] == 5
        # Generation is unaffected afterwards.
        assert content(generate(client, "four five")) == "four five"
    # Runtimes before 1.2.1 report no perf stats: the prompt's token count is unknown there.
    assert usage["prompt_tokens"] == (3 if abi in ("1.2", "1.3") else 0)
    assert usage["completion_tokens"] == 3
    assert any(
        line.startswith(f"init abi={ {'1.1': 110, '1.2.0': 120, '1.2': 121, '1.3': 130}[abi] } ")
        for line in log_lines(log)
    )


def test_stop_strings_end_the_answer(rkllm_server):
    srv, log = rkllm_server()
    with srv.client() as client:
        stopped = generate(client, "alpha beta gamma delta", stop=["gam"])
        assert content(stopped) == "alpha beta "
        assert stopped.json()["choices"][0]["finish_reason"] == "stop"


def test_disconnect_mid_stream_aborts_the_run(rkllm_server):
    srv, log = rkllm_server(RKLLM_DOUBLE_DELAY_MS="200")
    words = " ".join(f"w{i}" for i in range(40))
    with srv.client() as client:
        with client.stream("POST", "/generate", json={"stream": True, "messages": words}) as response:
            first = next(response.iter_lines())
            assert first.startswith("{")
        # The client is gone: the server must call rkllm_abort.
        lines = wait_for_line(log, "run_end")
        assert "abort" in lines
        end = next(line for line in lines if line.startswith("run_end"))
        assert "aborted=1" in end and "generated=40" not in end
        assert content(generate(client, "still here")) == "still here"


def test_run_error_is_clear_and_the_next_request_is_served(rkllm_server):
    srv, _ = rkllm_server(RKLLM_DOUBLE_FAIL="run", RKLLM_DOUBLE_FAIL_TRIGGER="explode")
    with srv.client() as client:
        failed = generate(client, "please explode now")
        assert failed.status_code == 502
        assert "RKLLM_RUN_ERROR" in failed.json()["error"]
        chunks = stream_chunks(client, "explode again")
        assert "RKLLM_RUN_ERROR" in chunks[-1]["error"]
        assert content(generate(client, "calm words")) == "calm words"
        assert client.get("/current_model").json() == {"model_name": MODEL}


def test_crash_in_the_runtime_leaves_the_server_up(rkllm_server):
    srv, _ = rkllm_server(RKLLM_DOUBLE_FAIL="crash", RKLLM_DOUBLE_FAIL_TRIGGER="crashme")
    with srv.client() as client:
        crashed = generate(client, "crashme please")
        assert crashed.status_code == 502
        assert "SIGABRT" in crashed.json()["error"] and "unloaded" in crashed.json()["error"]
        assert client.get("/current_model").status_code == 404
        assert client.post("/load_model", json={"model_name": MODEL}).status_code == 200
        assert content(generate(client, "back again")) == "back again"


def test_init_failure_is_a_clear_400_and_other_models_load(rkllm_server):
    srv, _ = rkllm_server(
        models=("broken.rkllm", MODEL), load=None, RKLLM_DOUBLE_FAIL="init", RKLLM_DOUBLE_FAIL_TRIGGER="broken"
    )
    with srv.client() as client:
        refused = client.post("/load_model", json={"model_name": "broken.rkllm"})
        assert refused.status_code == 400
        assert "rkllm_init failed" in refused.json()["error"] and "broken.rkllm" in refused.json()["error"]
        assert client.get("/current_model").status_code == 404
        assert client.post("/load_model", json={"model_name": MODEL}).status_code == 200
        assert content(generate(client, "works fine")) == "works fine"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"RKLLAMA_RKLLM_PLATFORM": ""}, "set RKLLAMA_RKLLM_PLATFORM"),
        ({"RKLLAMA_RKLLM_LIB": ""}, "librkllmrt.so was not found. Install librkllmrt.so from"),
    ],
    ids=["not-a-rockchip-board", "no-runtime-library"],
)
def test_missing_board_or_library_is_a_clear_400(start_server, tmp_path, rkllm_doubles, env, fragment):
    models_dir = make_models_dir(tmp_path / "models")
    rkllm_models_dir(models_dir, MODEL)
    srv = start_server(
        models_dir=models_dir,
        args=["--no-default"],
        env={**double_env(rkllm_doubles["1.3"]), **env},
        expect_model=False,
    )
    with srv.client() as client:
        refused = client.post("/load_model", json={"model_name": MODEL})
        assert refused.status_code == 400
        assert fragment in refused.json()["error"]
        # The server keeps serving its other models.
        assert client.post("/load_model", json={"model_name": DEFAULT_MODEL_NAME}).status_code == 200
        assert generate(client, "Hi", max_tokens=2).status_code == 200


def _runs_and_clears(log: Path) -> list[str]:
    return [line for line in log_lines(log) if line.startswith(("run ", "clear_kv_cache"))]


def test_a_conversation_continues_and_another_starts_clean(rkllm_server):
    srv, log = rkllm_server()
    first = [{"role": "user", "content": "alpha beta"}]
    with srv.client() as client:
        assert content(generate(client, first)) == "alpha beta"
        follow_up = [*first, {"role": "assistant", "content": "alpha beta"}, {"role": "user", "content": "gamma"}]
        # Only the new turn goes to the runtime, which keeps the conversation.
        assert content(generate(client, follow_up)) == "gamma"
        assert content(generate(client, [{"role": "user", "content": "epsilon"}])) == "epsilon"
        # Same start, another reply: not the conversation in the cache, so it is replayed whole.
        other = [*first, {"role": "assistant", "content": "no"}, {"role": "user", "content": "zeta"}]
        assert content(generate(client, other)) == "user: alpha beta assistant: no zeta"
    events = _runs_and_clears(log)
    assert len(events) == 6
    assert "keep_history=1 cache_before=0 " in events[0]
    assert "keep_history=1 cache_before=4 units=1 " in events[1]  # continued: 2 words in + 2 out
    assert events[2].startswith("clear_kv_cache") and "cache_before=0 units=1 " in events[3]
    assert events[4].startswith("clear_kv_cache") and "cache_before=0 units=6 " in events[5]


def _word_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer.json with a ChatML-like chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "be", "brief", "hello", "world"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))


def test_tokenizer_files_give_token_input_and_modelfile_settings_reach_the_runtime(rkllm_server, tmp_path):
    folder = tmp_path / "models" / "chat-rk"
    folder.mkdir(parents=True)
    (folder / "chat-rk.rkllm").write_bytes(b"model")
    (folder / "Modelfile").write_text(
        'FROM="chat-rk.rkllm"\nSYSTEM="be brief"\nTEMPERATURE=0.3\nNUM_CTX=1024\nENABLED_CPUS_MASK=0x30\nN_KEEP=16\n'
    )
    _word_tokenizer(folder)
    srv, log = rkllm_server(models=(), load="chat-rk")
    with srv.client() as client:
        answer = generate(client, [{"role": "user", "content": "hello world"}], temperature=0.5)
    # <|im_start|> system be brief <|im_end|> <|im_start|> user hello world <|im_end|> <|im_start|> assistant
    ids = [1, 3, 6, 7, 2, 1, 4, 8, 9, 2, 1, 5]
    assert content(answer) == " ".join(map(str, ids))  # the double echoes token ids
    assert answer.json()["usage"]["prompt_tokens"] == len(ids)
    lines = log_lines(log)
    init = next(line for line in lines if line.startswith("init abi="))
    assert "max_context_len=1024" in init and "temperature=0.30" in init
    extend = next(line for line in lines if line.startswith("init_extend"))
    assert "n_keep=16" in extend and "enabled_cpus_num=2 enabled_cpus_mask=0x30" in extend
    assert any(line.startswith("sampling ") and "temperature=0.50" in line for line in lines)  # per request (1.3)
    run = next(line for line in lines if line.startswith("run "))
    assert "input_type=1 " in run and "keep_history=0" in run  # tokens, from a clean cache


def test_modelfile_prompt_template_and_stop_strings(rkllm_server, tmp_path):
    folder = tmp_path / "models" / "templated"
    folder.mkdir(parents=True)
    (folder / "templated.rkllm").write_bytes(b"model")
    (folder / "Modelfile").write_text(
        'FROM="templated.rkllm"\nSYSTEM_PROMPT="You are terse."\nPROMPT_PREFIX="<u>"\nPROMPT_POSTFIX="<a>"\n'
        'STOP="swer|never"\n'
    )
    srv, log = rkllm_server(models=(), load="templated")
    with srv.client() as client:
        assert content(generate(client, "short answer")) == "short an"  # the Modelfile's stop string
        assert content(generate(client, "short answer", stop=["ort"])) == "sh"  # the request's wins
    assert "chat_template system=[You are terse.] prefix=[<u>] postfix=[<a>]" in log_lines(log)


def test_ollama_chat_on_an_rkllm_model(rkllm_server):
    srv, _ = rkllm_server(load=None)
    client = ollama.Client(host=srv.base_url)
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": ECHO}])
    assert reply.message.content == ECHO
    assert reply.eval_count == 4 and reply.prompt_eval_count == 3
    streamed = "".join(
        part.message.content
        for part in client.chat(model=MODEL, messages=[{"role": "user", "content": "a b"}], stream=True)
    )
    assert streamed == "a b"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_go_to_the_runtime_template_and_tool_results_continue(rkllm_server):
    srv, log = rkllm_server(load=None)
    client = ollama.Client(host=srv.base_url)
    asked = [{"role": "system", "content": "be helpful"}, {"role": "user", "content": "weather in Paris"}]
    reply = client.chat(model=MODEL, messages=asked, tools=[WEATHER_TOOL])
    assert reply.message.content == "weather in Paris"  # the system prompt went with the tools
    tools_line = next(line for line in log_lines(log) if line.startswith("function_tools"))
    assert tools_line.startswith("function_tools system=[be helpful] tools=[[{")
    assert '"name": "get_weather"' in tools_line and tools_line.endswith("tool_response=[tool_response]")
    answered = [*asked, {"role": "assistant", "content": "weather in Paris"}, {"role": "tool", "content": "sunny"}]
    assert client.chat(model=MODEL, messages=answered, tools=[WEATHER_TOOL]).message.content == "sunny"
    last_run = [line for line in log_lines(log) if line.startswith("run ")][-1]
    assert "role=tool " in last_run and "keep_history=1 " in last_run and "units=1 " in last_run


def test_openai_chat_tool_calls_and_embeddings_on_an_rkllm_model(rkllm_server):
    import openai

    srv, _ = rkllm_server(load=None)
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ECHO}])
    assert reply.choices[0].message.content == ECHO
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 4)
    # The double echoes a tool call written by the "user"; the dialect turns it into tool_calls.
    call = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    called = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": call}], tools=[WEATHER_TOOL]
    )
    tool_calls = called.choices[0].message.tool_calls
    assert tool_calls and tool_calls[0].function.name == "get_weather"
    assert json.loads(tool_calls[0].function.arguments) == {"city": "Paris"}
    vectors = client.embeddings.create(model=MODEL, input=["hello world", "hello world", "other words"]).data
    assert len(vectors[0].embedding) == 8  # the double's hidden size
    assert vectors[0].embedding == vectors[1].embedding != vectors[2].embedding
    assert abs(sum(v * v for v in vectors[0].embedding) - 1.0) < 1e-6


def test_with_tokenizer_files_a_long_history_drops_the_oldest_messages(rkllm_server, tmp_path):
    """The rkllm engine fits prompts as llama.cpp does (prompt_fit.py) when it can count tokens."""
    folder = tmp_path / "models" / "chat-rk"
    folder.mkdir(parents=True)
    (folder / "chat-rk.rkllm").write_bytes(b"model")
    (folder / "Modelfile").write_text('FROM="chat-rk.rkllm"\nSYSTEM="be brief"\nNUM_CTX=32\n')
    _word_tokenizer(folder)
    srv, _log = rkllm_server(models=(), load="chat-rk")
    turn = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]
    history = turn * 6  # 54 tokens with the system message
    with srv.client() as client:
        answer = generate(client, [*history, {"role": "user", "content": "world"}])
        body = answer.json()
        assert answer.status_code == 200 and body["truncated"] is True and body["truncated_messages"] >= 8
        assert body["usage"]["prompt_tokens"] <= 32 - 8  # a quarter of the context is left for the reply
        # The double echoes the token ids: the system message is kept, then the newest turns.
        ids = [int(t) for t in content(answer).split()]
        assert len(ids) == body["usage"]["prompt_tokens"]
        assert ids[:5] == [1, 3, 6, 7, 2] and ids[-6:] == [1, 4, 9, 2, 1, 5]
        refused = generate(client, [*history, {"role": "user", "content": "world"}], truncate=False)
        assert refused.status_code == 400 and "truncate is false" in refused.json()["error"]


def test_an_error_callback_after_abort_still_ends_the_answer_normally(rkllm_server):
    # rkllm.h does not say whether a run ended by rkllm_abort reports RKLLM_RUN_ERROR or FINISH;
    # this double reports the error, and a stop string (which aborts the run) must still end well.
    srv, log = rkllm_server(RKLLM_DOUBLE_ABORT_ERROR="1", RKLLM_DOUBLE_DELAY_MS="100")
    words = "alpha beta gamma " + " ".join(f"w{i}" for i in range(40))  # the abort lands mid-run
    with srv.client() as client:
        stopped = generate(client, words, stop=["gam"])
        assert content(stopped) == "alpha beta "
        assert stopped.json()["choices"][0]["finish_reason"] == "stop"
        assert "run error after abort" in wait_for_line(log, "run error after abort")
        assert content(generate(client, "next one")) == "next one"


def test_the_runtime_version_line_is_in_the_runner_log(rkllm_server):
    srv, _ = rkllm_server()
    with srv.client() as client:
        assert content(generate(client, "hi")) == "hi"
    # The runtime's own first line, in the format users of the real runtime report.
    assert "rkllm-runtime version: 1.3.0, rknpu driver version: 0.9.8, platform: RK3588" in srv.log()
