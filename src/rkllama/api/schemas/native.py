"""The native RKLLama API's request and response shapes (shared/spec/rkllama-rest-api.md).

Requests are parsed by hand in api/native.py; these models only describe them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from . import ALWAYS, GENERATES, WITH_BODY, any_of, errors, json_body, ok, route
from .common import ErrorBody, Strict, Truncation

MODEL_NAME = "SmolLM2-135M-Instruct"


# --- requests -----------------------------------------------------------------------------
class LoadModelRequest(BaseModel):
    model_name: str = Field(description="A model as /models lists it.", examples=[MODEL_NAME])


class ChatTurn(BaseModel):
    role: str = Field(description="system, user, assistant or tool.")
    content: str = ""
    images: list[str] | None = Field(
        None, description="Not in the spec, as Ollama's: base64 images for a vision model (docs/vision.md)."
    )


class GenerateRequest(BaseModel):
    messages: str | list[ChatTurn] = Field(
        description="A prompt string (sent as one user message), or a non-empty list of chat messages."
    )
    stream: bool | None = Field(None, description="Stream chunks (text/plain, one JSON object per chunk).")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = Field(None, description="Most tokens to generate (default: up to the context's end).")
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description="Text that ends the generation when produced.")


class RemoveRequest(BaseModel):
    model: str = Field(description="A model as /models lists it.", examples=["model1.rkllm"])


class PullRequest(BaseModel):
    model: str = Field(
        description="hf/<user>/<repo>/<file> (a .rkllm or .gguf file on Hugging Face), optionally hf/<user>/<repo>.",
        examples=["hf/username/repo/file.rkllm"],
    )


# --- responses ----------------------------------------------------------------------------
class Welcome(Strict):
    message: Literal["Welcome to RK-LLama!"]
    github: str


class ModelList(Strict):
    models: list[str] = Field(description="Model names: files and folders of the models directory.")


class Message(Strict):
    message: str


class CurrentModel(Strict):
    model_name: str


class Choice(Strict):
    role: Literal["assistant"]
    content: str = Field(description="The reply, or (streaming) this chunk's text.")
    finish_reason: Literal["stop", "length"] | None = Field(description="Null until the last chunk.")


class Usage(Strict):
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    tokens_per_second: float | None


class GenerateReply(Truncation):
    """The reply to /generate; streaming, each chunk has this shape (usage null until the last)."""

    id: Literal["rkllm_chat"]
    object: Literal["rkllm_chat"]
    created: int = Field(description="Unix time of the request.")
    choices: list[Choice]
    usage: Usage


GENERATE_STREAM = (
    "With stream true: chunks, each a JSON object of the non-streaming reply's shape followed by a blank "
    "line (`<json>\\n\\n`); `finish_reason` and `usage` are null until the last chunk. A failure after "
    'the 200 ends the stream with `{"error": "..."}`.'
)
PULL_STREAM = (
    "Progress lines: `Downloading <file> (<size> MB)...`, then `<percent>%` each time the whole percent "
    "changes, ending with `100%` once the model is in place. A failure after the 200 is the last line, "
    "`Error during download: <error>`, and no `100%` is sent."
)


# --- the routes' documentation (keyword arguments of their decorators) ----------------------
HOME = route(ok("Welcome.", json=Welcome), errors(*ALWAYS))
MODELS = route(ok("The models.", json=ModelList), errors(*ALWAYS, 500))
LOAD = route(ok("Loaded.", json=Message), errors(*WITH_BODY, 502, 503), body=json_body(LoadModelRequest))
UNLOAD = route(ok("Unloaded.", json=Message), errors(*ALWAYS))
CURRENT = route(ok("The current model.", json=CurrentModel), errors(*ALWAYS, 404))
GENERATE = route(
    ok(
        "The reply (JSON), or with stream true its chunks (text/plain).",
        json=GenerateReply,
        text=GENERATE_STREAM,
        text_chunk=any_of(GenerateReply, ErrorBody),
    ),
    errors(*GENERATES),
    body=json_body(GenerateRequest, example={"messages": "Hello, how are you?", "stream": False}),
)
REMOVE = route(ok("Deleted.", json=Message), errors(*WITH_BODY, 404, 409), body=json_body(RemoveRequest))
PULL = route(
    ok("Download in progress: plain-text progress lines.", text=PULL_STREAM),
    errors(*WITH_BODY, notes={400: 'Download error: {"error": "Error during download: <error>"}.'}),
    body=json_body(PullRequest),
)
