"""The dialects' pure parsing pieces: tool calls in a reply, keep_alive durations, Ollama
Modelfiles, and the name mapping of the models dir. (The servers' tests use them end to end.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from rkllama.api.dialect import ReplyText, ThinkingSplitter, parse_keep_alive
from rkllama.errors import BadRequest, Conflict, ModelNotFound
from rkllama.store.models_dir import ModelStore
from rkllama.store.names import new_store_name, ollama_name, openai_id, resolve_model
from rkllama.store.ollama_modelfile import parse_definition
from rkllama.toolcalls import parse_tool_calls

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("reply", "text", "calls"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "",
         [("get_weather", {"city": "Oslo"})]),
        ('Sure. <tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>', "Sure.",
         [("get_weather", {"city": "Rome"})]),
        ('```json\n[{"name": "get_weather", "arguments": {}}]\n```', "", [("get_weather", {})]),
        ('{"name": "launch_missiles", "arguments": {}}', '{"name": "launch_missiles", "arguments": {}}', []),
        ("It is sunny.", "It is sunny.", []),
        ('<tool_call>{"name": "get_weather", "arguments": {broken</tool_call>',
         '<tool_call>{"name": "get_weather", "arguments": {broken</tool_call>', []),
    ],
)  # fmt: skip
def test_tool_calls_are_found_only_for_offered_tools(reply: str, text: str, calls: list) -> None:
    remaining, found = parse_tool_calls(reply, TOOLS)
    assert remaining == text
    assert [(c.name, c.arguments) for c in found] == calls


def test_without_tools_a_reply_is_text() -> None:
    reply = '{"name": "get_weather", "arguments": {}}'
    assert parse_tool_calls(reply, None) == (reply, [])


def test_streamed_text_is_held_back_only_while_it_may_be_a_call() -> None:
    stream = ReplyText(TOOLS)
    assert stream.feed("  <tool") == ""
    assert stream.feed('_call>{"name": "get_weather", "arguments": {}}</tool_call>') == ""
    text, calls = stream.finish()
    assert text == "" and [c.name for c in calls] == ["get_weather"]
    plain = ReplyText(TOOLS)
    assert plain.feed(" <") == ""
    assert plain.feed("b>Hi") == " <b>Hi"
    assert plain.feed(" there") == " there"
    assert plain.finish() == ("", [])


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), ("0", 0.0), (300, 300.0), ("5m", 300.0), ("1h30m", 5400.0), ("-1", -1.0),
     ("-1m", -60.0), ("250ms", 0.25), (2.5, 2.5)],
)  # fmt: skip
def test_keep_alive_durations(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", True, [1]])
def test_bad_keep_alive_is_a_400(value: object) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        parse_keep_alive(value)


def test_ollama_and_rkllama_modelfiles() -> None:
    ollama_text = (
        "# a comment\nFROM smollm2:135m\nPARAMETER temperature 0.4\nPARAMETER num_ctx 2048\n"
        'PARAMETER stop "<|im_end|>"\nPARAMETER stop END\nSYSTEM """You are\nbrief."""\n'
    )
    definition = parse_definition(ollama_text)
    assert definition.source == "smollm2:135m"
    assert definition.values == {
        "TEMPERATURE": "0.4",
        "NUM_CTX": "2048",
        "STOP": "<|im_end|>|END",
        "SYSTEM": "You are\nbrief.",
    }
    rkllama = parse_definition('FROM="model.gguf"\nTEMPERATURE=0.3\n')
    assert rkllama.source == "model.gguf" and rkllama.values == {"TEMPERATURE": "0.3"}
    for bad in ("FROM x\nTEMPLATE {{ .Prompt }}", "FROM x\nPARAMETER mirostat 2", 'FROM x\nSYSTEM """never closed'):
        with pytest.raises(BadRequest):
            parse_definition(bad)


def test_name_mapping(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "qwen.gguf").write_bytes(b"GGUF")
    (tmp_path / "mine:v1").mkdir()
    (tmp_path / "mine:v1" / "m.gguf").write_bytes(b"GGUF")
    assert [ollama_name(n) for n in store.names()] == ["mine:v1", "qwen:latest", "SmolLM2-135M-Instruct:latest"]
    assert openai_id("qwen.gguf") == "qwen" and openai_id("mine:v1") == "mine:v1"
    for requested, name in [
        ("smollm2:135m", "SmolLM2-135M-Instruct"),
        ("SmolLM2-135M-Instruct:latest", "SmolLM2-135M-Instruct"),
        ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"),
        ("qwen", "qwen.gguf"),
        ("qwen:latest", "qwen.gguf"),
        ("qwen.gguf", "qwen.gguf"),
        ("mine:v1", "mine:v1"),
    ]:
        assert resolve_model(store, requested).name == name
    for missing in ("mine", "smollm2:360m", "../qwen.gguf", "/etc/passwd", "qwen:7b"):
        with pytest.raises(ModelNotFound):
            resolve_model(store, missing)
    assert new_store_name(store, "fresh:latest") == "fresh"
    for taken in ("qwen", "QWEN:latest", "mine:v1"):
        with pytest.raises(Conflict):
            new_store_name(store, taken)
    for invalid in ("../up", "a/b", ".hidden", "", "copy.gguf"):
        with pytest.raises(BadRequest):
            new_store_name(store, invalid)


@pytest.mark.parametrize(
    "pieces", [["<think>Hmm, 2+2.</think>\n\nIt is 4."], list("<think>Hmm, 2+2.</think>\n\nIt is 4.")]
)
def test_thinking_is_split_from_the_answer_as_it_streams(pieces: list[str]) -> None:
    splitter = ThinkingSplitter()
    outputs = [splitter.feed(piece) for piece in pieces] + [splitter.finish()]
    assert "".join(t for t, _ in outputs) == "Hmm, 2+2."
    assert "".join(c for _, c in outputs) == "It is 4."


def test_a_reply_without_thinking_is_all_content() -> None:
    splitter = ThinkingSplitter()
    assert splitter.feed(" <") == ("", "")
    assert splitter.feed("b>4") == ("", " <b>4")
    assert splitter.finish() == ("", "")
    unfinished = ThinkingSplitter()
    assert unfinished.feed("<think>still going</thi") == ("still going", "")
    assert unfinished.finish() == ("</thi", "")
