"""Tiny random dense HF checkpoints built from transformers' own config classes (and MiniCPM4's config.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config
from transformers import Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
# Longrope factors for head_dim 16 (8 frequencies); MiniCPM4 ships 64 of each for head_dim 128.
LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
SHORT = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]


def reference_model(family: str, seed: int = 0):
    """The transformers model a tiny checkpoint of ``family`` is built from (fp32, eval)."""
    torch.manual_seed(seed)
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(**COMMON, rope_theta=10000.0, attention_bias=True))
    elif family == "mistral":
        m = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=7))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=9, max_window_layers=2))
    elif family == "qwen3":
        m = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))
    elif family == "minicpm":
        m = LlamaForCausalLM(LlamaConfig(**COMMON))
    else:
        raise ValueError(family)
    with torch.no_grad():  # norms away from 1 so that a missing norm shows up
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


def make_dense_checkpoint(family: str, out: Path, seed: int = 0, minicpm_scales: dict | None = None) -> Path:
    """Save a tiny random ``family`` checkpoint to ``out``. MiniCPM4 has no transformers class: its checkpoint
    is a Llama one with MiniCPM's config.json (neutral μP scales unless ``minicpm_scales`` given)."""
    model = reference_model(family, seed)
    model.save_pretrained(out, safe_serialization=True)
    if family == "minicpm":
        cfg = json.loads((out / "config.json").read_text())
        n = cfg["num_hidden_layers"]
        cfg.update(model_type="minicpm", architectures=["MiniCPMForCausalLM"], scale_emb=1.0,
                   scale_depth=math.sqrt(n), dim_model_base=cfg["hidden_size"], use_mup=True)
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = 10000.0
        cfg["rope_scaling"] = None
        cfg.update(minicpm_scales or {})
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
