"""Mistral: Llama weights with one sliding window shared by every layer (or none)."""

from .base import Family, llama_like


def _config(hf: dict) -> dict:
    kw = llama_like(hf)
    kw["qkv_bias"] = kw["o_bias"] = False
    kw["sliding_windows"] = [hf.get("sliding_window")] * hf["num_hidden_layers"]
    return kw


FAMILY = Family(name="mistral", model_types=("mistral",), config_fn=_config)
