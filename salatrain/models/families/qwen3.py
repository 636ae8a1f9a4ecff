"""Qwen3: per-head RMSNorm on q and k before RoPE (``q_norm``/``k_norm``), ``attention_bias`` on all four."""

from .base import Family, llama_like, qwen_sliding_windows


def _config(hf: dict) -> dict:
    kw = llama_like(hf)
    kw["qk_norm"] = True
    kw["sliding_windows"] = qwen_sliding_windows(hf)
    return kw


FAMILY = Family(name="qwen3", model_types=("qwen3",), config_fn=_config)
