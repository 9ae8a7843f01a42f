"""Working around llama.cpp on CPUs where its defaults crash (runner process only)."""

from __future__ import annotations

import os

import llama_cpp


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as cpuinfo:
            return " amx_int8" in cpuinfo.read()
    except OSError:
        return False


def avoid_amx_weight_buffers() -> None:
    """llama.cpp's AMX weight buffers segfault on some AMX machines (llama.cpp issue
    #20824; seen here on every batched decode). On such CPUs load models without the
    extra buffer types, like llama-server's --no-repack. llama-cpp-python has no flag for
    it, so its default-params function is wrapped, in this runner process only.
    RKLLAMA_LLAMA_EXTRA_BUFFERS=1 keeps them."""
    if os.environ.get("RKLLAMA_LLAMA_EXTRA_BUFFERS") == "1" or not cpu_has_amx():
        return
    defaults = llama_cpp.llama_cpp.llama_model_default_params
    if getattr(defaults, "_rkllama_wrapped", False):
        return

    def without_extra_buffers():  # type: ignore[no-untyped-def]
        params = defaults()
        params.use_extra_bufts = False
        return params

    without_extra_buffers._rkllama_wrapped = True  # type: ignore[attr-defined]
    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
