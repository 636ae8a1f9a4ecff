"""What a family adapter is: how to read a dense HF checkpoint of one architecture into the hybrid's terms.

An adapter maps the base ``config.json`` to ``SalaHybridConfig`` fields and names the keys it drops (rotary
caches). The hybrid keeps transformers' weight names, so the keys a dense checkpoint must hold, with their
shapes, are those of the hybrid with every layer ``full_attention`` (built on the meta device). A hybrid family
(MiniCPM-SALA) gives its own layer mix and may rename a few weights. Conversion
fails on any key that is neither expected nor dropped, and on any shape that differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    """``renames``: (checkpoint name part, hybrid name part) pairs for weights named differently in the
    checkpoint; ``hybrid``: the checkpoint is already a hybrid (its config gives the layer mix)."""

    name: str
    model_types: tuple[str, ...]
    config_fn: Callable[[dict], dict]
    dropped: tuple[str, ...] = (r"(^|\.)rotary_emb\.inv_freq$",)
    renames: tuple[tuple[str, str], ...] = ()
    hybrid: bool = False

    def hybrid_config_kwargs(self, hf: dict) -> dict:
        """SalaHybridConfig keyword arguments for the dense model described by the config.json dict ``hf``."""
        kw = self.config_fn(hf)
        kw["base_model_type"] = self.name
        return kw

    def is_dropped(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.dropped)

    def hybrid_key(self, key: str) -> str:
        """The hybrid's name of the checkpoint tensor ``key``."""
        for theirs, ours in self.renames:
            key = key.replace(theirs, ours)
        return key

    def source_key(self, key: str) -> str:
        """The checkpoint's name of the hybrid tensor ``key``."""
        for theirs, ours in self.renames:
            key = key.replace(ours, theirs)
        return key


def rope_parameters(hf: dict) -> dict:
    """transformers-5 style rope dict from either ``rope_parameters`` or legacy ``rope_theta``/``rope_scaling``."""
    if hf.get("rope_parameters"):
        rp = dict(hf["rope_parameters"])
    else:
        rp = dict(hf.get("rope_scaling") or {})
        rp.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rp["rope_type"] = rp.pop("type", None) or rp.get("rope_type") or "default"
    rp.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        rp.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return rp


def llama_like(hf: dict) -> dict:
    """Fields every supported family shares (transformers' Llama names)."""
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        hidden_act=hf.get("hidden_act", "silu"),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        rope_parameters=rope_parameters(hf),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )


def qwen_sliding_windows(hf: dict) -> list:
    """Per-layer windows as transformers' Qwen2/Qwen3 configs derive them (``layer_types`` wins)."""
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", n) else "full_attention"
        for i in range(n)
    ]
    return [hf.get("sliding_window") if t == "sliding_attention" else None for t in types]
