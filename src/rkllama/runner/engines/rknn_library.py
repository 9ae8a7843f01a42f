"""ctypes binding of the few calls of Rockchip's `librknnrt.so` (rknn_api.h of
airockchip/rknn-toolkit2) that an image encoder needs: init, query, inputs_set, run,
outputs_get/release, destroy. Struct layouts follow rknn_api.h exactly; tests compare them
with a C program (tests/rknn_double).

Settings (environment of the server, inherited by its runner processes):
- RKLLAMA_RKNN_LIB: path of librknnrt.so (default: the system library path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from dataclasses import dataclass
from pathlib import Path

from .base import EngineError
from .rockchip_library import find_rockchip_library

LIB_ENV = "RKLLAMA_RKNN_LIB"
LIBRARY_NAME = "librknnrt.so"
INSTALL_HINT = (
    f"Install {LIBRARY_NAME} from https://github.com/airockchip/rknn-toolkit2 "
    "(rknpu2/runtime/Linux/librknn_api/aarch64) into /usr/lib, or set "
    f"{LIB_ENV} to its path. See docs/vision-rkllm.md."
)

RKNN_SUCC = 0
RKNN_MAX_DIMS = 16
RKNN_MAX_NAME_LEN = 256
# rknn_query_cmd
RKNN_QUERY_IN_OUT_NUM = 0
RKNN_QUERY_INPUT_ATTR = 1
RKNN_QUERY_OUTPUT_ATTR = 2
RKNN_QUERY_SDK_VERSION = 5
# rknn_tensor_type
RKNN_TENSOR_FLOAT32 = 0
RKNN_TENSOR_FLOAT16 = 1
RKNN_TENSOR_UINT8 = 3
# rknn_tensor_format
RKNN_TENSOR_NCHW = 0
RKNN_TENSOR_NHWC = 1

# rknn_context is uint32_t on 32-bit ARM (`#ifdef __arm__`), uint64_t everywhere else.
_IS_ARM32 = ctypes.sizeof(ctypes.c_void_p) == 4 and platform.machine().lower().startswith("arm")
RknnContext = ctypes.c_uint32 if _IS_ARM32 else ctypes.c_uint64
_enum = ctypes.c_int


class RknnInputOutputNum(ctypes.Structure):
    _fields_ = [("n_input", ctypes.c_uint32), ("n_output", ctypes.c_uint32)]


class RknnTensorAttr(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("n_dims", ctypes.c_uint32),
        ("dims", ctypes.c_uint32 * RKNN_MAX_DIMS),
        ("name", ctypes.c_char * RKNN_MAX_NAME_LEN),
        ("n_elems", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("fmt", _enum),
        ("type", _enum),
        ("qnt_type", _enum),
        ("fl", ctypes.c_int8),
        ("zp", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("w_stride", ctypes.c_uint32),
        ("size_with_stride", ctypes.c_uint32),
        ("pass_through", ctypes.c_uint8),
        ("h_stride", ctypes.c_uint32),
    ]

    def shape(self) -> list[int]:
        return list(self.dims[: min(self.n_dims, RKNN_MAX_DIMS)])


class RknnInput(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
        ("pass_through", ctypes.c_uint8),
        ("type", _enum),
        ("fmt", _enum),
    ]


class RknnOutput(ctypes.Structure):
    _fields_ = [
        ("want_float", ctypes.c_uint8),
        ("is_prealloc", ctypes.c_uint8),
        ("index", ctypes.c_uint32),
        ("buf", ctypes.c_void_p),
        ("size", ctypes.c_uint32),
    ]


class RknnSdkVersion(ctypes.Structure):
    _fields_ = [("api_version", ctypes.c_char * 256), ("drv_version", ctypes.c_char * 256)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "rknn_input_output_num": RknnInputOutputNum,
    "rknn_tensor_attr": RknnTensorAttr,
    "rknn_input": RknnInput,
    "rknn_output": RknnOutput,
    "rknn_sdk_version": RknnSdkVersion,
}

_context_p = ctypes.POINTER(RknnContext)
FUNCTIONS: dict[str, tuple[object, list[object]]] = {
    # rknn_init(ctx*, model, size, flag, rknn_init_extend*): size 0 means `model` is a file path.
    "rknn_init": (ctypes.c_int, [_context_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]),
    "rknn_destroy": (ctypes.c_int, [RknnContext]),
    "rknn_query": (ctypes.c_int, [RknnContext, _enum, ctypes.c_void_p, ctypes.c_uint32]),
    "rknn_inputs_set": (ctypes.c_int, [RknnContext, ctypes.c_uint32, ctypes.POINTER(RknnInput)]),
    "rknn_run": (ctypes.c_int, [RknnContext, ctypes.c_void_p]),
    "rknn_outputs_get": (ctypes.c_int, [RknnContext, ctypes.c_uint32, ctypes.POINTER(RknnOutput), ctypes.c_void_p]),
    "rknn_outputs_release": (ctypes.c_int, [RknnContext, ctypes.c_uint32, ctypes.POINTER(RknnOutput)]),
}


def load_rknn_library() -> tuple[str, ctypes.CDLL]:
    """The runtime library and its path, with every prototype set. (The dynamic loader keeps
    one copy of it per process; setting the prototypes again costs nothing.)"""
    path = find_rockchip_library(
        LIB_ENV, LIBRARY_NAME, INSTALL_HINT, f"This model's vision encoder needs {LIBRARY_NAME}, which was not found."
    )
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise EngineError(f"Cannot load {path}: {exc}. {INSTALL_HINT}") from None
    for name, (restype, argtypes) in FUNCTIONS.items():
        if not hasattr(lib, name):
            raise EngineError(f"{path} does not export {name}: it is not the rknn runtime. {INSTALL_HINT}")
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return path, lib


@dataclass
class RknnModel:
    """One loaded .rknn model: its context, tensors and the runtime's version."""

    lib: ctypes.CDLL
    library_path: str
    context: int
    inputs: list[RknnTensorAttr]
    outputs: list[RknnTensorAttr]
    api_version: str
    driver_version: str

    @classmethod
    def open(cls, model_path: str) -> RknnModel:
        library_path, lib = load_rknn_library()
        context = RknnContext(0)
        code = lib.rknn_init(ctypes.byref(context), model_path.encode(), 0, 0, None)
        if code != RKNN_SUCC or not context.value:
            raise EngineError(
                f"rknn_init failed (code {code}) for the vision encoder {Path(model_path).name}: it may be converted "
                "for another SoC or rknn runtime version; the runner log has the runtime's own message."
            )
        model = cls(lib, library_path, context.value, [], [], "", "")
        try:
            model._query_tensors()
            version = RknnSdkVersion()
            # The version is only a label (the struct layouts have not changed): a failed query leaves it empty.
            if model._query(RKNN_QUERY_SDK_VERSION, version) == RKNN_SUCC:
                model.api_version = version.api_version.decode(errors="replace").strip()
                model.driver_version = version.drv_version.decode(errors="replace").strip()
        except BaseException:
            model.close()
            raise
        return model

    def _query(self, command: int, info: ctypes.Structure) -> int:
        return int(self.lib.rknn_query(self.context, command, ctypes.byref(info), ctypes.sizeof(info)))

    def _query_tensors(self) -> None:
        counts = RknnInputOutputNum()
        if self._query(RKNN_QUERY_IN_OUT_NUM, counts) != RKNN_SUCC or counts.n_input < 1 or counts.n_output < 1:
            raise EngineError("The vision encoder's rknn model reports no input or output tensors.")
        for command, count, into in (
            (RKNN_QUERY_INPUT_ATTR, counts.n_input, self.inputs),
            (RKNN_QUERY_OUTPUT_ATTR, counts.n_output, self.outputs),
        ):
            for index in range(count):
                attr = RknnTensorAttr(index=index)  # the runtime reads `index` to know which tensor
                code = self._query(command, attr)
                if code != RKNN_SUCC:
                    raise EngineError(f"rknn_query of the vision encoder's tensor {index} failed (code {code}).")
                into.append(attr)

    def run(self, data: ctypes.Array, tensor_type: int, tensor_format: int) -> list[bytes]:
        """Run the model on one input buffer; returns each output as float32 bytes."""
        given = (RknnInput * 1)()
        given[0].index = 0
        given[0].buf = ctypes.cast(data, ctypes.c_void_p)
        given[0].size = ctypes.sizeof(data)
        given[0].pass_through = 0  # the runtime converts type/format (and applies a baked-in mean/std)
        given[0].type = tensor_type
        given[0].fmt = tensor_format
        code = self.lib.rknn_inputs_set(self.context, 1, given)
        if code == RKNN_SUCC:
            code = self.lib.rknn_run(self.context, None)
        if code != RKNN_SUCC:
            raise EngineError(f"The vision encoder failed on an image (rknn code {code}); see the runner log.")
        outputs = (RknnOutput * len(self.outputs))()
        for index in range(len(self.outputs)):
            outputs[index].index = index
            outputs[index].want_float = 1
        code = self.lib.rknn_outputs_get(self.context, len(self.outputs), outputs, None)
        if code != RKNN_SUCC:
            raise EngineError(f"rknn_outputs_get failed (code {code}) for the vision encoder; see the runner log.")
        try:
            return [ctypes.string_at(o.buf, o.size) if o.buf else b"" for o in outputs]
        finally:
            # All of them (upstream's demo releases only the first).
            self.lib.rknn_outputs_release(self.context, len(self.outputs), outputs)

    def close(self) -> None:
        if self.context:
            self.lib.rknn_destroy(self.context)
            self.context = 0
