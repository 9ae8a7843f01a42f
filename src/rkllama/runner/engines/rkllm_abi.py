"""ctypes mirror of Rockchip's `rkllm.h` (airockchip/rknn-llm), one layout per runtime ABI.

The runtime changed its structs between releases without renaming them, so the layout is
built per ABI: "1.1" (1.1.0-1.1.4), "1.2.0", "1.2" (1.2.1-1.2.3) and "1.3" (1.3.0).
Field order and C types follow the header exactly (enums are C ints, `bool` is one byte);
tests compare every size and offset with a C program compiled for the same ABI.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

ABI_VERSIONS = ("1.1", "1.2.0", "1.2", "1.3")
ABI_NUMBERS = {"1.1": 110, "1.2.0": 120, "1.2": 121, "1.3": 130}

# LLMCallState
RKLLM_RUN_NORMAL = 0
RKLLM_RUN_WAITING = 1
RKLLM_RUN_FINISH = 2
RKLLM_RUN_ERROR = 3
RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4  # 1.1 only
# RKLLMInputType
RKLLM_INPUT_PROMPT = 0
RKLLM_INPUT_TOKEN = 1
RKLLM_INPUT_EMBED = 2
RKLLM_INPUT_MULTIMODAL = 3
# RKLLMInferMode
RKLLM_INFER_GENERATE = 0
RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
RKLLM_INFER_GET_LOGITS = 2  # 1.2.0+
# CPU masks of rkllm.h (1.2.0+), for extend_param.enabled_cpus_mask
CPU0, CPU1, CPU2, CPU3, CPU4, CPU5, CPU6, CPU7 = (1 << n for n in range(8))

LLMHandle = ctypes.c_void_p
_enum = ctypes.c_int


def abi_number(version: str) -> int:
    return ABI_NUMBERS[version]


def _struct(name: str, fields: list[tuple[str, Any]], anonymous: tuple[str, ...] = ()) -> type[ctypes.Structure]:
    namespace: dict[str, Any] = {"_fields_": fields}
    if anonymous:
        namespace["_anonymous_"] = anonymous
    return type(name, (ctypes.Structure,), namespace)


@dataclass(frozen=True)
class RkllmAbi:
    """The types and function prototypes of one runtime ABI."""

    version: str
    ExtendParam: type[ctypes.Structure]
    Param: type[ctypes.Structure]
    LoraAdapter: type[ctypes.Structure]
    EmbedInput: type[ctypes.Structure]
    TokenInput: type[ctypes.Structure]
    MultiModalInput: type[ctypes.Structure]
    Input: type[ctypes.Structure]
    LoraParam: type[ctypes.Structure]
    PromptCacheParam: type[ctypes.Structure]
    CrossAttnParam: type[ctypes.Structure] | None
    SamplingParam: type[ctypes.Structure] | None
    InferParam: type[ctypes.Structure]
    ResultLastHiddenLayer: type[ctypes.Structure]
    ResultLogits: type[ctypes.Structure] | None
    PerfStat: type[ctypes.Structure] | None
    Result: type[ctypes.Structure]
    ResultCallback: Any  # CFUNCTYPE
    TokenizerCallback: Any | None
    EmbedCallback: Any | None
    Callback: type[ctypes.Structure] | None
    functions: dict[str, tuple[Any, list[Any]]]

    @property
    def number(self) -> int:
        return ABI_NUMBERS[self.version]

    # Capabilities the engine asks about, named after what they enable.
    @property
    def has_keep_history(self) -> bool:  # keep_history, n_keep, rkllm_clear_kv_cache, chat template
        return self.number >= 120

    @property
    def has_perf(self) -> bool:  # RKLLMPerfStat in RKLLMResult, int callback, role/enable_thinking
        return self.number >= 121

    @property
    def has_run_sampling(self) -> bool:  # per-run RKLLMSamplingParam and max_new_tokens
        return self.number >= 130

    def structs(self) -> dict[str, type[ctypes.Structure]]:
        """Every struct of the header by its C name (for the layout test)."""
        names = {
            "RKLLMExtendParam": self.ExtendParam,
            "RKLLMParam": self.Param,
            "RKLLMLoraAdapter": self.LoraAdapter,
            "RKLLMEmbedInput": self.EmbedInput,
            "RKLLMTokenInput": self.TokenInput,
            "RKLLMMultiModalInput": self.MultiModalInput,
            "RKLLMInput": self.Input,
            "RKLLMLoraParam": self.LoraParam,
            "RKLLMPromptCacheParam": self.PromptCacheParam,
            "RKLLMCrossAttnParam": self.CrossAttnParam,
            "RKLLMSamplingParam": self.SamplingParam,
            "RKLLMInferParam": self.InferParam,
            "RKLLMResultLastHiddenLayer": self.ResultLastHiddenLayer,
            "RKLLMResultLogits": self.ResultLogits,
            "RKLLMPerfStat": self.PerfStat,
            "RKLLMResult": self.Result,
            "RKLLMCallback": self.Callback,
        }
        return {name: struct for name, struct in names.items() if struct is not None}

    def bind(self, lib: ctypes.CDLL) -> None:
        """Set argtypes/restype of every function of this ABI on the loaded library."""
        for name, (restype, argtypes) in self.functions.items():
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes


def build_abi(version: str) -> RkllmAbi:
    if version not in ABI_NUMBERS:
        raise ValueError(f"unknown rkllm ABI {version!r}; known: {', '.join(ABI_VERSIONS)}")
    abi = ABI_NUMBERS[version]
    c_char_p, c_size_t, c_float, c_int, c_int8, c_int32 = (
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_int8,
        ctypes.c_int32,
    )
    c_uint8, c_uint32, c_bool, c_void_p = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_bool, ctypes.c_void_p
    float_p, int32_p = ctypes.POINTER(c_float), ctypes.POINTER(c_int32)

    extend: list[tuple[str, Any]] = [("base_domain_id", c_int32)]
    if abi >= 120:
        extend += [("embed_flash", c_int8), ("enabled_cpus_num", c_int8), ("enabled_cpus_mask", c_uint32)]
    if abi >= 121:
        extend += [("n_batch", c_uint8), ("use_cross_attn", c_int8), ("reserved", c_uint8 * 104)]
    elif abi >= 120:
        extend += [("reserved", c_uint8 * 106)]
    else:
        extend += [("reserved", c_uint8 * 112)]
    ExtendParam = _struct("RKLLMExtendParam", extend)

    param: list[tuple[str, Any]] = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
    ]
    if abi >= 120:
        param += [("n_keep", c_int32)]
    param += [
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
    ]
    if abi >= 130:
        param += [("ignore_eos_token", c_bool)]
    param += [("is_async", c_bool)]
    if abi < 130:
        param += [("img_start", c_char_p), ("img_end", c_char_p), ("img_content", c_char_p)]
    param += [("extend_param", ExtendParam)]
    Param = _struct("RKLLMParam", param)

    LoraAdapter = _struct(
        "RKLLMLoraAdapter", [("lora_adapter_path", c_char_p), ("lora_adapter_name", c_char_p), ("scale", c_float)]
    )
    EmbedInput = _struct("RKLLMEmbedInput", [("embed", float_p), ("n_tokens", c_size_t)])
    TokenInput = _struct("RKLLMTokenInput", [("input_ids", int32_p), ("n_tokens", c_size_t)])

    if abi >= 130:
        Image = _struct(
            "RKLLMMultiModalImage",
            [
                ("image_embed", float_p),
                ("n_image_tokens", c_size_t),
                ("n_image", c_size_t),
                ("image_start", c_char_p),
                ("image_end", c_char_p),
                ("image_content", c_char_p),
                ("image_width", c_size_t),
                ("image_height", c_size_t),
            ],
        )
        Video = _struct(
            "RKLLMMultiModalVideo",
            [
                ("video_embed", float_p),
                ("n_frame_tokens", c_size_t),
                ("n_frame_per_video", c_size_t),
                ("n_video", c_size_t),
                ("video_start", c_char_p),
                ("video_end", c_char_p),
                ("video_content", c_char_p),
                ("frame_width", c_size_t),
                ("frame_height", c_size_t),
            ],
        )
        multimodal: list[tuple[str, Any]] = [("prompt", c_char_p), ("image", Image), ("video", Video)]
    else:
        multimodal = [("prompt", c_char_p), ("image_embed", float_p), ("n_image_tokens", c_size_t)]
        if abi >= 121:
            multimodal += [("n_image", c_size_t), ("image_width", c_size_t), ("image_height", c_size_t)]
    MultiModalInput = _struct("RKLLMMultiModalInput", multimodal)

    InputUnion = type(
        "RKLLMInputUnion",
        (ctypes.Union,),
        {
            "_fields_": [
                ("prompt_input", c_char_p),
                ("embed_input", EmbedInput),
                ("token_input", TokenInput),
                ("multimodal_input", MultiModalInput),
            ]
        },
    )
    input_fields: list[tuple[str, Any]] = []
    if abi >= 121:
        input_fields += [("role", c_char_p), ("enable_thinking", c_bool)]
    # The C union is anonymous: its members read as fields of RKLLMInput.
    input_fields += [("input_type", _enum), ("_input", InputUnion)]
    Input = _struct("RKLLMInput", input_fields, anonymous=("_input",))

    LoraParam = _struct("RKLLMLoraParam", [("lora_adapter_name", c_char_p)])
    PromptCacheParam = _struct("RKLLMPromptCacheParam", [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)])
    CrossAttnParam = (
        _struct(
            "RKLLMCrossAttnParam",
            [
                ("encoder_k_cache", float_p),
                ("encoder_v_cache", float_p),
                ("encoder_mask", float_p),
                ("encoder_pos", int32_p),
                ("num_tokens", c_int),
            ],
        )
        if abi >= 121
        else None
    )
    SamplingParam = (
        _struct(
            "RKLLMSamplingParam",
            [
                ("top_k", c_int32),
                ("top_p", c_float),
                ("temperature", c_float),
                ("repeat_penalty", c_float),
                ("frequency_penalty", c_float),
                ("presence_penalty", c_float),
                ("mirostat", c_int32),
                ("mirostat_tau", c_float),
                ("mirostat_eta", c_float),
            ],
        )
        if abi >= 130
        else None
    )

    infer: list[tuple[str, Any]] = [
        ("mode", _enum),
        ("lora_params", ctypes.POINTER(LoraParam)),
        ("prompt_cache_params", ctypes.POINTER(PromptCacheParam)),
    ]
    if SamplingParam is not None:
        infer += [("sampling_params", ctypes.POINTER(SamplingParam))]
    if abi >= 120:
        infer += [("keep_history", c_int)]
    if abi >= 130:
        infer += [("max_new_tokens", c_int32)]
    InferParam = _struct("RKLLMInferParam", infer)

    LastHidden = _struct(
        "RKLLMResultLastHiddenLayer", [("hidden_states", float_p), ("embd_size", c_int), ("num_tokens", c_int)]
    )
    Logits = (
        _struct("RKLLMResultLogits", [("logits", float_p), ("vocab_size", c_int), ("num_tokens", c_int)])
        if abi >= 120
        else None
    )
    PerfStat = (
        _struct(
            "RKLLMPerfStat",
            [
                ("prefill_time_ms", c_float),
                ("prefill_tokens", c_int),
                ("generate_time_ms", c_float),
                ("generate_tokens", c_int),
                ("memory_usage_mb", c_float),
            ],
        )
        if abi >= 121
        else None
    )
    # `text` is read as raw bytes (c_void_p): it may end inside a UTF-8 character.
    result: list[tuple[str, Any]] = [("text", c_void_p), ("token_id", c_int32), ("last_hidden_layer", LastHidden)]
    if Logits is not None:
        result += [("logits", Logits)]
    if PerfStat is not None:
        result += [("perf", PerfStat)]
    Result = _struct("RKLLMResult", result)

    # The result callback returns int from 1.2.1 on (0 = continue, 1 = pause), void before.
    callback_restype = c_int if abi >= 121 else None
    ResultCallback = ctypes.CFUNCTYPE(callback_restype, ctypes.POINTER(Result), c_void_p, _enum)
    TokenizerCallback = EmbedCallback = Callback = None
    if abi >= 130:
        TokenizerCallback = ctypes.CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, int32_p, c_int32)
        EmbedCallback = ctypes.CFUNCTYPE(c_int, c_void_p, int32_p, ctypes.c_uint64, c_void_p, ctypes.c_uint64)
        Callback = _struct(
            "RKLLMCallback",
            [
                ("result_callback", ResultCallback),
                ("result_userdata", c_void_p),
                ("tokenizer_callback", TokenizerCallback),
                ("tokenizer_userdata", c_void_p),
                ("embed_callback", EmbedCallback),
                ("embed_userdata", c_void_p),
            ],
        )

    handle_p = ctypes.POINTER(LLMHandle)
    init_callback = ctypes.POINTER(Callback) if Callback is not None else ResultCallback
    functions: dict[str, tuple[Any, list[Any]]] = {
        "rkllm_createDefaultParam": (Param, []),
        "rkllm_init": (c_int, [handle_p, ctypes.POINTER(Param), init_callback]),
        "rkllm_load_lora": (c_int, [LLMHandle, ctypes.POINTER(LoraAdapter)]),
        "rkllm_load_prompt_cache": (c_int, [LLMHandle, c_char_p]),
        "rkllm_release_prompt_cache": (c_int, [LLMHandle]),
        "rkllm_destroy": (c_int, [LLMHandle]),
        "rkllm_run": (c_int, [LLMHandle, ctypes.POINTER(Input), ctypes.POINTER(InferParam), c_void_p]),
        "rkllm_run_async": (c_int, [LLMHandle, ctypes.POINTER(Input), ctypes.POINTER(InferParam), c_void_p]),
        "rkllm_abort": (c_int, [LLMHandle]),
        "rkllm_is_running": (c_int, [LLMHandle]),
    }
    if abi >= 120:
        functions["rkllm_set_chat_template"] = (c_int, [LLMHandle, c_char_p, c_char_p, c_char_p])
    if abi >= 121:
        int_p = ctypes.POINTER(c_int)
        functions["rkllm_clear_kv_cache"] = (c_int, [LLMHandle, c_int, int_p, int_p])
        functions["rkllm_get_kv_cache_size"] = (c_int, [LLMHandle, int_p])
        functions["rkllm_set_function_tools"] = (c_int, [LLMHandle, c_char_p, c_char_p, c_char_p])
        functions["rkllm_set_cross_attn_params"] = (c_int, [LLMHandle, ctypes.POINTER(CrossAttnParam)])
    elif abi >= 120:
        functions["rkllm_clear_kv_cache"] = (c_int, [LLMHandle, c_int])

    return RkllmAbi(
        version=version,
        ExtendParam=ExtendParam,
        Param=Param,
        LoraAdapter=LoraAdapter,
        EmbedInput=EmbedInput,
        TokenInput=TokenInput,
        MultiModalInput=MultiModalInput,
        Input=Input,
        LoraParam=LoraParam,
        PromptCacheParam=PromptCacheParam,
        CrossAttnParam=CrossAttnParam,
        SamplingParam=SamplingParam,
        InferParam=InferParam,
        ResultLastHiddenLayer=LastHidden,
        ResultLogits=Logits,
        PerfStat=PerfStat,
        Result=Result,
        ResultCallback=ResultCallback,
        TokenizerCallback=TokenizerCallback,
        EmbedCallback=EmbedCallback,
        Callback=Callback,
        functions=functions,
    )
