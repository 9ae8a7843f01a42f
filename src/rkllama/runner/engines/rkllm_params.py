"""The rkllm runtime's parameters: from the request, then the Modelfile, then defaults.

Init-time values fill `RKLLMParam` (context size, CPU cores, the sampling defaults); from
runtime 1.3 on, sampling and max_new_tokens are also set per run (`RKLLMSamplingParam`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import BadRequest
from ...store.modelfile import Modelfile
from ...types import SamplingOptions
from .base import EngineError, LoadSpec
from .rkllm_abi import CPU0, CPU1, CPU2, CPU3, CPU4, CPU5, CPU6, CPU7, RkllmAbi

DEFAULT_CONTEXT = 4096
DEFAULT_MAX_NEW_TOKENS = 2048
BUILTIN_SAMPLING = SamplingOptions(
    temperature=0.8, top_p=0.9, top_k=40, repeat_penalty=1.1, presence_penalty=0.0, frequency_penalty=0.0
)
# The big cores: Rockchip recommends running the runtime's CPU work on them.
BIG_CORES = {"rk3588": CPU4 | CPU5 | CPU6 | CPU7, "rk3576": CPU4 | CPU5 | CPU6 | CPU7}
ALL_FOUR_CORES = CPU0 | CPU1 | CPU2 | CPU3


@dataclass
class InitSettings:
    max_context_len: int
    max_new_tokens: int
    sampling: SamplingOptions
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    skip_special_token: bool
    ignore_eos_token: bool
    n_keep: int
    base_domain_id: int
    embed_flash: int
    enabled_cpus_mask: int
    enabled_cpus_num: int
    n_batch: int


def _int(modelfile: Modelfile, key: str, default: int) -> int:
    raw = modelfile.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw, 0)  # accepts 0xF0 for masks
    except ValueError:
        raise EngineError(f"Modelfile: {key} must be an integer, got {raw!r}.") from None


def _float(modelfile: Modelfile, key: str, default: float) -> float:
    try:
        value = modelfile.get_float(key)
    except BadRequest as exc:
        raise EngineError(exc.message) from None
    return default if value is None else value


def _bool(modelfile: Modelfile, key: str, default: bool) -> bool:
    value = modelfile.get_bool(key)
    return default if value is None else value


def init_settings(spec: LoadSpec, platform: str) -> InitSettings:
    modelfile = Modelfile(spec.modelfile)
    try:
        sampling = modelfile.sampling_defaults().merged_over(BUILTIN_SAMPLING)
    except BadRequest as exc:
        raise EngineError(exc.message) from None
    context = spec.overrides.get("num_ctx") or _int(modelfile, "NUM_CTX", DEFAULT_CONTEXT)
    mask = _int(modelfile, "ENABLED_CPUS_MASK", BIG_CORES.get(platform, ALL_FOUR_CORES))
    settings = InitSettings(
        max_context_len=int(context),
        max_new_tokens=sampling.max_tokens if sampling.max_tokens is not None else DEFAULT_MAX_NEW_TOKENS,
        sampling=sampling,
        mirostat=_int(modelfile, "MIROSTAT", 0),
        mirostat_tau=_float(modelfile, "MIROSTAT_TAU", 5.0),
        mirostat_eta=_float(modelfile, "MIROSTAT_ETA", 0.1),
        skip_special_token=_bool(modelfile, "SKIP_SPECIAL_TOKEN", True),
        ignore_eos_token=_bool(modelfile, "IGNORE_EOS_TOKEN", False),
        n_keep=_int(modelfile, "N_KEEP", -1),
        base_domain_id=_int(modelfile, "BASE_DOMAIN_ID", 0),
        embed_flash=_int(modelfile, "EMBED_FLASH", 1),
        enabled_cpus_mask=mask,
        enabled_cpus_num=_int(modelfile, "ENABLED_CPUS_NUM", bin(mask).count("1")),
        n_batch=_int(modelfile, "N_BATCH", 1),
    )
    if settings.max_context_len <= 0:
        raise EngineError(f"The context length must be positive, got {settings.max_context_len}.")
    if not 1 <= settings.n_batch <= 255:
        raise EngineError(f"Modelfile: N_BATCH must be between 1 and 255, got {settings.n_batch}.")
    if not 0 < settings.enabled_cpus_mask < 256:
        raise EngineError(f"Modelfile: ENABLED_CPUS_MASK must select some of the CPUs 0-7, got {mask:#x}.")
    return settings


def fill_init_param(abi: RkllmAbi, param: Any, model_path: str, s: InitSettings) -> None:
    """Write the settings into an `RKLLMParam` made by rkllm_createDefaultParam."""
    param.model_path = model_path.encode()
    param.max_context_len = s.max_context_len
    param.max_new_tokens = s.max_new_tokens
    param.top_k = s.sampling.top_k or 0
    param.top_p = s.sampling.top_p or 0.0
    param.temperature = s.sampling.temperature or 0.0
    param.repeat_penalty = s.sampling.repeat_penalty or 0.0
    param.frequency_penalty = s.sampling.frequency_penalty or 0.0
    param.presence_penalty = s.sampling.presence_penalty or 0.0
    param.mirostat = s.mirostat
    param.mirostat_tau = s.mirostat_tau
    param.mirostat_eta = s.mirostat_eta
    param.skip_special_token = s.skip_special_token
    param.is_async = False
    param.extend_param.base_domain_id = s.base_domain_id
    if abi.number >= 120:
        param.n_keep = s.n_keep
        param.extend_param.embed_flash = s.embed_flash
        param.extend_param.enabled_cpus_num = s.enabled_cpus_num
        param.extend_param.enabled_cpus_mask = s.enabled_cpus_mask
    if abi.number >= 121:
        param.extend_param.n_batch = s.n_batch
        param.extend_param.use_cross_attn = 0
    if abi.number >= 130:
        param.ignore_eos_token = s.ignore_eos_token


def run_sampling(abi: RkllmAbi, options: SamplingOptions, s: InitSettings) -> Any:
    """A per-run `RKLLMSamplingParam` (1.3+): the request's values over the model's."""
    assert abi.SamplingParam is not None
    merged = options.merged_over(s.sampling)
    sampling = abi.SamplingParam()
    sampling.top_k = merged.top_k or 0
    sampling.top_p = merged.top_p if merged.top_p is not None else 0.0
    sampling.temperature = merged.temperature if merged.temperature is not None else 0.0
    sampling.repeat_penalty = merged.repeat_penalty if merged.repeat_penalty is not None else 1.0
    sampling.frequency_penalty = merged.frequency_penalty or 0.0
    sampling.presence_penalty = merged.presence_penalty or 0.0
    sampling.mirostat = s.mirostat
    sampling.mirostat_tau = s.mirostat_tau
    sampling.mirostat_eta = s.mirostat_eta
    return sampling
