"""Qwen2 / Qwen2.5: bias on q/k/v (not o), optional sliding window above ``max_window_layers``."""

from .base import Family, llama_like, qwen_sliding_windows


def _config(hf: dict) -> dict:
    kw = llama_like(hf)
    kw["qkv_bias"], kw["o_bias"] = True, False
    kw["sliding_windows"] = qwen_sliding_windows(hf)
    return kw


FAMILY = Family(name="qwen2", model_types=("qwen2",), config_fn=_config)
