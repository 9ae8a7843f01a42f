"""RKLLM_INPUT_MULTIMODAL: a text prompt holding one `<image>` per picture, and the pictures'
embeddings, laid out as each runtime ABI wants them (rkllm.h of rknn-llm at each release tag):

- 1.1.x / 1.2.0: `image_embed`, `n_image_tokens` (one image: the field is not per image and
  there is no image count), the markers in RKLLMParam `img_start/img_end/img_content` at init.
- 1.2.1-1.2.3: + `n_image`, `image_width`, `image_height`; `image_embed` holds
  n_image x n_image_tokens x embedding values; markers still in RKLLMParam.
- 1.3.0: the same in an `image` sub-struct with `image_start/image_end/image_content`; `video` empty.
"""

from __future__ import annotations

import ctypes
from array import array
from typing import Any

from .base import EngineError
from .rkllm_abi import RKLLM_INPUT_MULTIMODAL, RkllmAbi
from .rkllm_prompt import IMAGE_MARKER
from .rkllm_vision import ImageEncoder, ImageMarkers


def fill_image_markers(abi: RkllmAbi, param: Any, markers: ImageMarkers) -> None:
    """Before 1.3 the markers are load-time settings (RKLLMParam); from 1.3 on they go with each input."""
    if abi.number < 130:
        # Assigning bytes to a c_char_p field keeps them alive with the struct.
        param.img_start = markers.start.encode()
        param.img_end = markers.end.encode()
        param.img_content = markers.content.encode()


def check_images(abi: RkllmAbi, text: str, images: list[str], model: str) -> None:
    """Refuse what the runtime would misread: a count of images it cannot take, or a text whose
    own `<image>` would claim an image that is not there."""
    if len(images) > 1 and abi.number < 121:
        raise EngineError(
            f"Model {model} runs on rkllm runtime {abi.version}, which takes one image per request "
            f"(this one holds {len(images)}); runtime 1.2.1 or newer takes several."
        )
    if text.count(IMAGE_MARKER) != len(images):
        raise EngineError(
            f"The text of a request with images may not contain {IMAGE_MARKER!r}: the rkllm runtime reads it as "
            "the place of an image."
        )


def set_multimodal(abi: RkllmAbi, rk_input: Any, text: str, encoder: ImageEncoder, images: list[str]) -> list[Any]:
    """Encode the images and fill `rk_input`; returns the buffers it points into (keep them alive)."""
    values = array("f")
    for image in images:
        values.extend(encoder.encode(image))
    embeds = (ctypes.c_float * len(values)).from_buffer_copy(values.tobytes())
    prompt = ctypes.create_string_buffer(text.encode("utf-8"))
    rk_input.input_type = RKLLM_INPUT_MULTIMODAL
    mm = rk_input.multimodal_input
    mm.prompt = ctypes.cast(prompt, ctypes.c_char_p)
    keep: list[Any] = [embeds, prompt]
    target = mm.image if abi.number >= 130 else mm
    target.image_embed = embeds
    if abi.number >= 121:
        target.n_image_tokens = encoder.n_tokens  # per image, with n_image images
        target.n_image = len(images)
        target.image_width = encoder.width
        target.image_height = encoder.height
    else:
        target.n_image_tokens = encoder.n_tokens * len(images)  # one image (check_images)
    if abi.number >= 130:
        given = encoder.markers
        markers = [ctypes.create_string_buffer(m.encode()) for m in (given.start, given.end, given.content)]
        keep += markers
        target.image_start, target.image_end, target.image_content = (ctypes.cast(m, ctypes.c_char_p) for m in markers)
    return keep
