"""Model names as Ollama and OpenAI clients write them, mapped onto the models directory.

The store names a model by its file or folder name (`SmolLM2-135M-Instruct`,
`qwen.gguf`). Dialect clients expect Ollama's `name:tag`. The mapping:

- listed name: the store name, minus a flat file's `.gguf`/`.rkllm` suffix, plus `:latest`
  unless it already holds a tag (`SmolLM2-135M-Instruct:latest`, `qwen:latest`, `mine:v1`);
- a requested name resolves, first match wins, to the store entry whose name is
  1. exactly the request, 2. the request minus `:latest`, 3. that plus `.gguf`/`.rkllm`,
  4. the same ignoring case, 5. for `family:tag`, the entry named `family-tag` or the only
  one starting with `family-tag-` (so `smollm2:135m` finds `SmolLM2-135M-Instruct`);
- a new name (copy, create) is stored as a folder named like the request minus `:latest`.

Matching is done against the listed names only, so a request never reaches a path. Names
that can never be a model (too long, hidden, control characters; see name_rules.py) are a 400
before any matching; `model 'x' not found` (404) is for well-formed names that are not here.
"""

from __future__ import annotations

import os

from ..errors import BadRequest, Conflict, ModelNotFound
from .models_dir import MODEL_SUFFIXES, ModelEntry, ModelStore, check_model_name
from .name_rules import LATEST, check_requested_name, shown


def _strip_suffix(name: str) -> str:
    for suffix in MODEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def ollama_name(store_name: str) -> str:
    """The `name:tag` a dialect client sees for a store entry."""
    base = _strip_suffix(store_name)
    return base if ":" in base else base + LATEST


def openai_id(store_name: str) -> str:
    """The model id in /v1/models: the Ollama name without the implicit `:latest`."""
    name = ollama_name(store_name)
    return name[: -len(LATEST)] if name.endswith(LATEST) else name


def _match(requested: str, names: list[str]) -> str | None:
    base = requested[: -len(LATEST)] if requested.endswith(LATEST) else requested
    exact = [requested, base, *(base + suffix for suffix in MODEL_SUFFIXES)]
    for wanted in exact:
        if wanted in names:
            return wanted
    lowered = {name.lower(): name for name in names}
    for wanted in exact:
        if wanted.lower() in lowered:
            return lowered[wanted.lower()]
    if ":" in base:
        dashed = base.replace(":", "-").lower()
        if dashed in lowered:
            return lowered[dashed]
        prefixed = [name for name in names if name.lower().startswith(dashed + "-")]
        if len(prefixed) == 1:
            return prefixed[0]
        if len(prefixed) > 1:
            raise BadRequest(f"Model name {shown(requested)} is ambiguous: it matches {', '.join(sorted(prefixed))}.")
    return None


def resolve_model(store: ModelStore, requested: object) -> ModelEntry:
    """The store entry a dialect's model name means, or ModelNotFound (404)."""
    if not isinstance(requested, str) or not requested.strip():
        raise BadRequest("'model' is required: the name of a model, as listed by /api/tags or /v1/models.")
    wanted = check_requested_name(requested.strip())
    matched = _match(wanted, store.names())
    if matched is None:
        raise ModelNotFound(wanted, f"model '{wanted}' not found")
    return store.resolve(matched)


def new_store_name(store: ModelStore, requested: object) -> str:
    """The folder name for a new model (copy, create); refused if taken or not a plain name."""
    if not isinstance(requested, str) or not requested.strip():
        raise BadRequest("The new model's name must be a non-empty string.")
    name = requested.strip()
    name = name[: -len(LATEST)] if name.endswith(LATEST) else name
    check_model_name(name)
    if _strip_suffix(name) != name:
        raise BadRequest(f"Invalid model name {shown(requested)}: it must not end with a model suffix.")
    taken = {n.lower() for n in store.names()} | {_strip_suffix(n).lower() for n in store.names()}
    if name.lower() in taken or os.path.lexists(store.root / name):
        raise Conflict(f"A model named {shown(requested)} already exists; delete it first.")
    return name
