"""RKLLama: a local LLM server for Rockchip NPUs (rkllm) and CPUs (llama.cpp)."""

__version__ = "0.1.0"
