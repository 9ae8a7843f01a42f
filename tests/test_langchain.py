"""Two agents users build with LangChain, each through its own library against the real server:
`langchain-ollama`'s ChatOllama on /api and `langchain-openai`'s ChatOpenAI on /v1, a tool bound
with `bind_tools`. The 135M model does not pick tools reliably, so the call is forced (a JSON
schema `format` for Ollama, which has no tool_choice; `tool_choice` for OpenAI) and greedy; the
tests check what crosses the wire: the model's tool call comes back and LangChain parses it, and
the follow-up request carrying the tool's result gets an answer."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI

MODEL = "smollm2:135m"
QUESTION = HumanMessage("What is the weather in Paris? Use the get_weather tool.")
WEATHER = "It is sunny and 21 degrees in {city}."
# The object Ollama-dialect tool calls are parsed from, as a schema for `format`.
CALL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "arguments"],
}
GREEDY = {"temperature": 0, "seed": 1}


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return WEATHER.format(city=city)


def run_tool(reply: AIMessage) -> ToolMessage:
    assert reply.tool_calls, f"no tool call parsed from {reply!r}"
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    result = get_weather.invoke(call)
    assert isinstance(result, ToolMessage) and result.content == WEATHER.format(city=call["args"]["city"])
    return result


def test_a_chat_ollama_agent_calls_its_tool_and_answers_with_the_result(server) -> None:
    caller = ChatOllama(model=MODEL, base_url=server.base_url, format=CALL_SCHEMA, num_predict=60, **GREEDY)
    first = caller.bind_tools([get_weather]).invoke([QUESTION])
    result = run_tool(first)
    answerer = ChatOllama(model=MODEL, base_url=server.base_url, num_predict=40, **GREEDY)
    final = answerer.bind_tools([get_weather]).invoke([QUESTION, first, result])
    assert isinstance(final, AIMessage) and (final.content or final.tool_calls)
    assert final.response_metadata["done"] is True
    assert final.usage_metadata is not None and final.usage_metadata["output_tokens"] > 0


def test_a_chat_openai_agent_calls_its_tool_and_answers_with_the_result(server) -> None:
    llm = ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1", api_key="unused", max_tokens=60, **GREEDY)
    first = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([QUESTION])
    assert first.response_metadata["finish_reason"] == "tool_calls"
    result = run_tool(first)
    final = llm.bind_tools([get_weather]).invoke([QUESTION, first, result])
    assert isinstance(final, AIMessage) and (final.content or final.tool_calls)
    assert final.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    assert final.usage_metadata is not None and final.usage_metadata["input_tokens"] > 0
