"""Shapes shared by the dialects: the error bodies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A response shape: fields not listed here are a schema violation (the fuzz test checks)."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(Strict):
    """The error body of the native and Ollama APIs."""

    error: str = Field(description="What was wrong, and what to do about it.")


class OpenAIErrorDetail(Strict):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error or server_error.")
    param: str | None = None
    code: str | None = Field(None, description="invalid_api_key, model_not_found, or null.")


class OpenAIErrorBody(Strict):
    """OpenAI's error shape, used for every error under /v1/."""

    error: OpenAIErrorDetail


class Truncation(Strict):
    """Fields of a final reply whose prompt was trimmed to fit the context (docs/ollama.md)."""

    truncated: bool | None = None
    truncated_messages: int | None = Field(None, description="Oldest messages dropped.")
    truncated_tokens: int | None = Field(None, description="Tokens cut from the prompt.")
