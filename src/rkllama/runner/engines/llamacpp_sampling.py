"""What constrains and samples a llama.cpp reply: grammars from formats and forced tool
calls, and the sampler chain (the one `Llama.generate` builds, so NUM_PARALLEL does not
change what is sampled)."""

from __future__ import annotations

import json
from typing import Any

from llama_cpp import LlamaGrammar
from llama_cpp._internals import LlamaModel, LlamaSampler
from llama_cpp.llama_grammar import JSON_GBNF

from ...types import GenerateRequest, SamplingOptions
from .base import EngineError
from .llamacpp_grammar import GrammarSampler, TokenSampler


def tool_call_schema(tools: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """JSON schema of one call to the chosen tool (or to any tool for "required")."""
    functions = [t.get("function", t) for t in tools]
    if choice != "required":
        functions = [f for f in functions if f.get("name") == choice]
        if not functions:
            raise EngineError(f"tool_choice names {choice!r}, which is not among the tools.")
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def grammar_for(request: GenerateRequest) -> LlamaGrammar | None:
    """The grammar that constrains a request's reply: a forced tool call, JSON, a JSON schema."""
    try:
        if request.tools and request.tool_choice:
            schema = tool_call_schema(request.tools, request.tool_choice)
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        if request.response_format == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if isinstance(request.response_format, dict):
            return LlamaGrammar.from_json_schema(json.dumps(request.response_format), verbose=False)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"The JSON schema in format could not be turned into a grammar: {exc}") from None
    return None


def sampler_chain(model: LlamaModel, options: SamplingOptions, grammar: LlamaGrammar | None, seed: int) -> TokenSampler:
    """The chain `Llama.generate` builds, so NUM_PARALLEL does not change what is sampled; its
    first link, the penalties, is applied to the logits before (llamacpp_penalties.py). A
    grammar checks the chain's pick instead of leading it (llamacpp_grammar.py): the same greedy
    answers, for far less work a token."""
    sampler = LlamaSampler()
    temperature = options.temperature
    if temperature < 0.0:
        sampler.add_dist(seed)
    elif temperature == 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_k(options.top_k or 0)
        sampler.add_typical(1.0, 1)
        sampler.add_top_p(options.top_p, 1)
        sampler.add_min_p(options.min_p, 1)
        sampler.add_temp(temperature)
        sampler.add_dist(seed)
    if grammar is None:
        return sampler
    constraint = LlamaSampler()
    constraint.add_grammar(model, grammar)
    return GrammarSampler(sampler, constraint, model.n_vocab())
