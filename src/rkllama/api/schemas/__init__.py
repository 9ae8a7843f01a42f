"""Wire schemas for /openapi.json: what each route really accepts and answers.

The routes read their bodies by hand (api/common.py json_object, with clear 400s), so
FastAPI cannot see them. These helpers describe them on the route decorators
instead, without touching how requests are parsed:

- `json_body(Model)` is an `openapi_extra` with the request body's JSON schema;
- `responses(...)` is the decorator's `responses=`: JSON bodies, streams (NDJSON, SSE,
  plain text) described per chunk, and the error bodies of each status.

Schemas are inlined (no `$ref` into `$defs`) so they are valid wherever OpenAPI puts them.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from .common import ErrorBody

JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
TEXT = "text/plain"

# What a status means, for the error responses every route shares.
ERROR_DESCRIPTIONS = {
    400: "Bad request: the body is not JSON, a field is missing, of the wrong type or out of range.",
    401: "The API key is missing or wrong.",
    403: "The request's Origin or Host is not allowed.",
    404: "The model (or route) was not found.",
    409: "Conflict with the model's state (being pulled, name taken).",
    413: "The request body is larger than the server's limit.",
    415: "The body's Content-Type is not JSON (a browser's form or text/plain; see docs/security.md).",
    500: "Internal server error.",
    502: "The model's runner failed (crashed, or stopped answering).",
    503: "The server is busy: every loaded model is answering and no other can be loaded.",
    504: "The model's runner made no progress within the watchdog's time.",
}
# Every route may answer these (key, Origin/Host checks); routes with a body also these.
ALWAYS = (400, 401, 403)
WITH_BODY = (400, 401, 403, 413, 415)
GENERATES = (*WITH_BODY, 404, 502, 503, 504)


def inline_schema(model: type[BaseModel], *, mode: str = "validation") -> dict[str, Any]:
    """The model's JSON schema with every `$ref` into `$defs` replaced by its definition."""
    schema = model.model_json_schema(mode=mode)  # type: ignore[arg-type]
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = resolve(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
                extra = {k: resolve(v) for k, v in node.items() if k != "$ref"}
                return {**target, **extra}
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def rename_property(schema: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """For wire names that are Python keywords (`from`), stored as `from_` on the model."""
    properties = schema.get("properties", {})
    if old in properties:
        schema["properties"] = {(new if key == old else key): value for key, value in properties.items()}
        schema["required"] = [new if key == old else key for key in schema.get("required", [])]
        if not schema["required"]:
            del schema["required"]
    return schema


def json_body(
    model: type[BaseModel] | dict[str, Any],
    *,
    description: str = "",
    example: dict[str, Any] | None = None,
    required: tuple[str, ...] = (),
    patch: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON request body (`curl -d`'s form type is also read as
    JSON from clients that send no Origin; see docs/security.md).

    `required` names fields a parser model defaults but the route refuses when empty (a
    dialect's `model`: also given minLength 1); `patch` narrows properties the route checks
    by hand (an enum of accepted strings)."""
    schema = copy.deepcopy(model) if isinstance(model, dict) else inline_schema(model)
    properties = schema.setdefault("properties", {})
    for name in required:
        properties[name] = {k: v for k, v in properties[name].items() if k != "default"}
        if properties[name].get("type") == "string":
            properties[name]["minLength"] = 1
        schema["required"] = sorted({*schema.get("required", []), name})
    for name, changes in (patch or {}).items():
        properties[name] = {**properties[name], **changes}
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    body: dict[str, Any] = {"required": True, "content": {JSON: media}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def _schema(model: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    return model if isinstance(model, dict) else inline_schema(model, mode="serialization")


def sse_event(data: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event whose `data` is JSON of the `data` schema, or the final `[DONE]`."""
    json_data = {"type": "string", "contentMediaType": JSON, "contentSchema": data}
    return {
        "type": "object",
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": {"type": "string"}},
        "required": ["data"],
    }


def content(
    *,
    json: type[BaseModel] | dict[str, Any] | None = None,
    ndjson: type[BaseModel] | dict[str, Any] | None = None,
    sse: type[BaseModel] | dict[str, Any] | None = None,
    text: str | None = None,
    text_chunk: type[BaseModel] | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A response's media types. For streams the schema is one item's: an NDJSON line, a
    server-sent event (OpenAPI 3.1 style); a plain-text stream of JSON chunks names its
    chunk's schema in `x-chunk-schema`."""
    out: dict[str, Any] = {}
    if json is not None:
        out[JSON] = {"schema": _schema(json)}
    if ndjson is not None:
        out[NDJSON] = {"schema": _schema(ndjson)}
    if sse is not None:
        out[SSE] = {"schema": sse_event(_schema(sse))}
    if text is not None:
        out[TEXT] = {"schema": {"type": "string", "description": text}}
        if text_chunk is not None:
            out[TEXT]["x-chunk-schema"] = _schema(text_chunk)
    return out


def ok(description: str, **media: Any) -> dict[int | str, dict[str, Any]]:
    """The 200 response (media as in `content`; none for an empty body)."""
    return {200: {"description": description, "content": content(**media)}}


def errors(
    *codes: int, model: type[BaseModel] | None = None, notes: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """Error responses with the dialect's error body (default: `{"error": "..."}`)."""
    schema = _schema(model or ErrorBody)
    return {
        code: {"description": (notes or {}).get(code, ERROR_DESCRIPTIONS[code]), "content": {JSON: {"schema": schema}}}
        for code in sorted(set(codes))
    }


def responses(*parts: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    merged: dict[int | str, dict[str, Any]] = {}
    for part in parts:
        merged.update(part)
    return merged


def any_of(*models: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    """One stream line that is one of these shapes (a chunk, or the error that ends it)."""
    return {"anyOf": [_schema(model) for model in models]}


def route(
    *parts: dict[int | str, dict[str, Any]], body: dict[str, Any] | None = None, empty: bool = False
) -> dict[str, Any]:
    """Keyword arguments for a route decorator: its documented responses and request body.

    `response_model=None` keeps FastAPI from merging a schema inferred from the return type
    into the documented 200 (the returned dicts are sent as they are either way); `empty`
    routes answer a bare 200 with no body."""
    kwargs: dict[str, Any] = {"responses": responses(*parts)}
    if empty:
        kwargs["response_class"] = Response
    else:
        kwargs["response_model"] = None
    if body is not None:
        kwargs["openapi_extra"] = body
    return kwargs
