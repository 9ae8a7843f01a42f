"""The image side of an rkllm vision model: its `.rknn` encoder (vision tower + projector, run by
librknnrt) turns a picture into the float32 embeddings the `.rkllm` model takes in
RKLLM_INPUT_MULTIMODAL (docs/vision-rkllm.md).

As in Rockchip's multimodal demo (rknn-llm examples/multimodal_model_demo, deploy/src): the image
is made RGB, padded to the encoder's aspect with a 127.5 grey and resized to its input size, and
sent as uint8 NHWC: rknn-toolkit2 bakes the model's mean/std into the .rknn at conversion
(`rknn.config(mean_values, std_values)`, export/export_vision_rknn.py), so the runtime normalises.
An encoder converted without them gets the image normalised here (IMAGE_MEAN / IMAGE_STD) as float32.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import io
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ...store.modelfile import Modelfile
from .base import EngineError
from .rknn_library import RKNN_TENSOR_FLOAT32, RKNN_TENSOR_NCHW, RKNN_TENSOR_NHWC, RKNN_TENSOR_UINT8, RknnModel

# Where an image goes in the prompt: the runtime replaces it by IMG_START, the image tokens, IMG_END.
IMAGE_MARKER = "<image>"
# Upstream's Qwen2-VL markers (the demos' defaults).
DEFAULT_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
PAD_GREY = 128  # the demo's cv::Scalar(127.5, ...) as OpenCV rounds it into a uint8 image
CACHED_IMAGES = 16  # embeddings kept, so a conversation re-sent whole does not re-encode its pictures


@dataclass(frozen=True)
class ImageMarkers:
    start: str
    end: str
    content: str


def image_markers(modelfile: Modelfile) -> ImageMarkers:
    start, end, content = (modelfile.get(k) for k in ("IMG_START", "IMG_END", "IMG_CONTENT"))
    return ImageMarkers(
        start if start is not None else DEFAULT_MARKERS[0],
        end if end is not None else DEFAULT_MARKERS[1],
        content if content is not None else DEFAULT_MARKERS[2],
    )


def _positive(modelfile: Modelfile, key: str) -> int | None:
    raw = modelfile.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise EngineError(f"Modelfile: {key} must be a positive integer, got {raw!r}.")
    return value


def _triple(modelfile: Modelfile, key: str) -> tuple[float, float, float] | None:
    raw = modelfile.get(key)
    if raw is None or raw == "":
        return None
    try:
        values = tuple(float(v) for v in raw.replace(",", " ").split())
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or (key == "IMAGE_STD" and any(v <= 0 for v in values)):
        raise EngineError(f"Modelfile: {key} must be three numbers (R, G, B on a 0-1 scale), got {raw!r}.")
    return values  # type: ignore[return-value]


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """RGB, scaled to fit width x height keeping its aspect, centred on grey (upstream's expand2square)."""
    image = image.convert("RGB")
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new("RGB", (width, height), (PAD_GREY, PAD_GREY, PAD_GREY))
    canvas.paste(image.resize(size, Image.Resampling.BILINEAR), ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


class ImageEncoder:
    """A loaded .rknn vision encoder and the Modelfile's image settings."""

    def __init__(self, path: str, modelfile: Modelfile) -> None:
        self.path = path
        self.markers = image_markers(modelfile)
        self.mean = _triple(modelfile, "IMAGE_MEAN")
        self.std = _triple(modelfile, "IMAGE_STD")
        if (self.mean is None) != (self.std is None):
            raise EngineError("Modelfile: IMAGE_MEAN and IMAGE_STD go together (both or neither).")
        wanted = (_positive(modelfile, "IMAGE_WIDTH"), _positive(modelfile, "IMAGE_HEIGHT"))
        wanted_tokens = _positive(modelfile, "N_IMAGE_TOKENS")
        self.model = RknnModel.open(path)
        try:
            self.width, self.height, self.channels = self._input_size(wanted)
            self.n_tokens, self.token_width = self._output_size(wanted_tokens)
        except BaseException:
            self.model.close()
            raise
        self._cache: OrderedDict[str, array] = OrderedDict()

    def _input_size(self, wanted: tuple[int | None, int | None]) -> tuple[int, int, int]:
        attr = self.model.inputs[0]
        dims = attr.shape()
        if len(dims) == 4:
            # Read as upstream's init_imgenc does: NCHW is [1, C, H, W], anything else [1, H, W, C].
            height, width, channels = (dims[2], dims[3], dims[1]) if attr.fmt == RKNN_TENSOR_NCHW else dims[1:4]
        else:
            height, width, channels = 0, 0, 3
        width, height = wanted[0] or width, wanted[1] or height
        if channels != 3 or width <= 0 or height <= 0:
            raise EngineError(
                f"The vision encoder {Path(self.path).name} takes input {dims}, not an RGB image; "
                "set IMAGE_WIDTH and IMAGE_HEIGHT in the Modelfile if its size is not in the model."
            )
        return width, height, channels

    def _output_size(self, wanted: int | None) -> tuple[int, int]:
        """Image tokens and the width of one token's embedding: the first output dimension above 1
        and the one after it (as upstream's demo reads them); several outputs (deepstack features)
        are joined per token."""
        dims = self.model.outputs[0].shape()
        found = next((i for i, d in enumerate(dims) if d > 1), None)
        tokens, width = (dims[found], dims[found + 1]) if found is not None and found + 1 < len(dims) else (0, 0)
        if wanted is not None and tokens and wanted != tokens:
            raise EngineError(
                f"Modelfile: N_IMAGE_TOKENS={wanted}, but the vision encoder {Path(self.path).name} gives {tokens}."
            )
        tokens = tokens or (wanted or 0)
        if tokens <= 0 or width <= 0:
            raise EngineError(f"Cannot tell image tokens from the vision encoder's output shape {dims}.")
        return tokens, width * len(self.model.outputs)

    @property
    def version(self) -> str:
        return self.model.api_version

    def _pixels(self, image: Image.Image) -> tuple[ctypes.Array, int, int]:
        """The buffer, tensor type and layout to send."""
        fitted = fit_image(image, self.width, self.height)
        if self.mean is None or self.std is None:
            data = fitted.tobytes()  # RGB rows: NHWC uint8
            return (ctypes.c_uint8 * len(data)).from_buffer_copy(data), RKNN_TENSOR_UINT8, RKNN_TENSOR_NHWC
        planes = []
        for band, mean, std in zip(fitted.split(), self.mean, self.std, strict=True):
            # (v / 255 - mean) / std as Pillow's linear point() on a float image; planes make NCHW.
            planes.append(band.convert("F").point(lambda v, m=mean, s=std: v * (1 / (255 * s)) - m / s).tobytes())
        data = b"".join(planes)
        return (ctypes.c_float * (len(data) // 4)).from_buffer_copy(data), RKNN_TENSOR_FLOAT32, RKNN_TENSOR_NCHW

    def encode(self, image_b64: str) -> array:
        """n_tokens x token_width float32 values for one base64 image (checked by the API layer)."""
        key = hashlib.sha256(image_b64.encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            image = Image.open(io.BytesIO(base64.b64decode(image_b64)))
            image.load()
        except Exception as exc:  # Pillow raises many kinds; the API layer already checked it
            raise EngineError(f"An image could not be decoded: {exc}") from None
        buffer, tensor_type, tensor_format = self._pixels(image)
        outputs = self.model.run(buffer, tensor_type, tensor_format)
        values = self._join(outputs)
        self._cache[key] = values
        while len(self._cache) > CACHED_IMAGES:
            self._cache.popitem(last=False)
        return values

    def _join(self, outputs: list[bytes]) -> array:
        each = self.token_width // len(outputs)
        row = each * 4  # bytes of one token in one output
        if any(len(o) < self.n_tokens * row for o in outputs):
            raise EngineError("The vision encoder returned fewer values than its output shape says.")
        values = array("f")
        if len(outputs) == 1:
            values.frombytes(outputs[0][: self.n_tokens * row])
        else:
            for token in range(self.n_tokens):  # token-major: each token's features of every output
                for output in outputs:
                    values.frombytes(output[token * row : (token + 1) * row])
        return values

    def close(self) -> None:
        self.model.close()
