"""A tiny, random CLIP-vision projector (mmproj GGUF) that llama.cpp's libmtmd loads and runs.

No real vision model is reachable from the tests, so this writes the smallest one clip.cpp
accepts: the LLaVA "mlp" projector (mm.0 -> GELU -> mm.2) over a 2-block ViT of width 32.
Without `image_grid_pinpoints` mtmd uses its fixed-size preprocessor: every image, whatever
its size, is resized (and padded) to `image_size` square, so one image is always
(image_size / patch_size) ** 2 tokens - no tiling, no slices, no extra marker tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

IMAGE_SIZE = 64
PATCH_SIZE = 16
VISION_WIDTH = 32  # hidden size of the ViT
VISION_FF = 64  # must differ from VISION_WIDTH: clip.cpp swaps ffn up/down when ffn_down's rows == width
VISION_HEADS = 2
# clip.cpp's llava graph stops one block short of the last ("second to last layer" features),
# so 2 blocks are needed for one to actually run.
VISION_BLOCKS = 2
PROJ_HIDDEN = 64
N_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2


@dataclass(frozen=True)
class TinyProjector:
    path: Path
    image_size: int  # every image is resized to image_size x image_size
    patch_size: int
    tokens_per_image: int  # image tokens (KV positions) one image becomes, whatever its size
    n_embd: int  # width of the embeddings it produces: the text model's n_embd


def write_tiny_mmproj(path: Path, n_embd: int = 576, seed: int = 0) -> TinyProjector:
    """Writes the projector to `path`; the same seed gives byte-identical files."""
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        # Small magnitudes keep every activation (and the text model fed with them) finite.
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("rkllama-tiny-mmproj")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", VISION_WIDTH)
    writer.add_uint32("clip.vision.feed_forward_length", VISION_FF)
    writer.add_uint32("clip.vision.block_count", VISION_BLOCKS)
    writer.add_uint32("clip.vision.attention.head_count", VISION_HEADS)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_uint32("clip.vision.projection_dim", n_embd)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    # numpy shapes are ggml's ne reversed: a Linear(in, out) weight is (out, in).
    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": weights(VISION_WIDTH, 3, PATCH_SIZE, PATCH_SIZE),  # conv kernel (OC, IC, KH, KW)
        "v.patch_embd.bias": zeros(VISION_WIDTH),
        "v.position_embd.weight": weights(N_PATCHES, VISION_WIDTH),
        "v.pre_ln.weight": ones(VISION_WIDTH),
        "v.pre_ln.bias": zeros(VISION_WIDTH),
    }
    for il in range(VISION_BLOCKS):
        block = f"v.blk.{il}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{block}.{name}.weight"] = weights(VISION_WIDTH, VISION_WIDTH)
            tensors[f"{block}.{name}.bias"] = zeros(VISION_WIDTH)
        for name in ("ln1", "ln2"):
            tensors[f"{block}.{name}.weight"] = ones(VISION_WIDTH)
            tensors[f"{block}.{name}.bias"] = zeros(VISION_WIDTH)
        tensors[f"{block}.ffn_up.weight"] = weights(VISION_FF, VISION_WIDTH)
        tensors[f"{block}.ffn_up.bias"] = zeros(VISION_FF)
        tensors[f"{block}.ffn_down.weight"] = weights(VISION_WIDTH, VISION_FF)
        tensors[f"{block}.ffn_down.bias"] = zeros(VISION_WIDTH)
    tensors["mm.0.weight"] = weights(PROJ_HIDDEN, VISION_WIDTH)
    tensors["mm.0.bias"] = zeros(PROJ_HIDDEN)
    tensors["mm.2.weight"] = weights(n_embd, PROJ_HIDDEN)  # its rows are what mtmd checks against the text model
    tensors["mm.2.bias"] = zeros(n_embd)
    for name, data in tensors.items():
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyProjector(
        path=path,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        tokens_per_image=N_PATCHES,
        n_embd=n_embd,
    )
