"""A tiny checkpoint in MiniCPM-SALA's released schema, and its forward written from DESIGN §5 alone.

``make_sala_checkpoint`` writes config.json (every released key) and model.safetensors (released weight names).
``released_logits`` is the released model's forward in fp64 with Python-level loops: the μP scales, Lightning
layers as the quadratic form of the fixed-decay recurrence (q/k RMSNorm, then RoPE, slopes 2^(-8h/H)), sparse
layers NoPE through the InfLLM-V2 oracle under the released rules (coarse normaliser, per-sequence dense_len,
block-level local window). It shares no code with salatrain's model or the exported modeling files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers.naive import infllmv2_naive, lightning_naive

AUTO_MAP = {
    "AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
    "AutoModel": "modeling_minicpm_sala.MiniCPMSALAModel",
    "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM",
}
# 3 visible blocks of 8 (24 tokens) < dense_len 32: a prefill of >= 32 tokens really drops blocks.
SPARSE = {"block_size": 8, "dense_len": 32, "init_blocks": 1, "kernel_size": 4, "kernel_stride": 2, "topk": 2,
          "window_size": 8, "use_nope": False}


def sala_config(vocab_size: int = 128, mixers=("minicpm4", "lightning-attn", "lightning-attn", "minicpm4")) -> dict:
    n, heads, hidden = len(mixers), 4, 64
    return {
        "_name_or_path": "tiny-minicpm-sala", "architectures": ["MiniCPMSALAForCausalLM"], "auto_map": dict(AUTO_MAP),
        "model_type": "minicpm_sala", "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 96,
        "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": hidden // heads,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": None, "initializer_range": 0.1, "use_cache": True, "scale_emb": 12.0, "scale_depth": 1.4,
        "dim_model_base": 16, "mup_denominator": 32, "mixer_types": list(mixers), "sparse_config": dict(SPARSE),
        "attention_bias": False, "attention_dropout": 0.0, "attn_use_rope": False, "attn_use_output_gate": True,
        "lightning_nh": heads, "lightning_nkv": heads, "lightning_head_dim": hidden // heads,
        "lightning_scale": "1/sqrt(d)", "lightning_use_rope": True, "qk_norm": True, "use_output_norm": True,
        "use_output_gate": True, "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 2,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.56.0",
    }


def sala_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released names; norms away from 1 so that a missing norm shows."""
    g = torch.Generator().manual_seed(seed)
    h, d, heads, kv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    def norm(size):
        return 0.5 + torch.rand(size, generator=g)

    out = {"model.embed_tokens.weight": w(vocab, h, std=0.05), "model.norm.weight": norm(h),
           "lm_head.weight": w(vocab, h)}
    for i, mixer in enumerate(cfg["mixer_types"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
                    p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                    p + "mlp.down_proj.weight": w(h, inter)})
        a = p + "self_attn."
        if mixer == "minicpm4":
            out.update({a + "q_proj.weight": w(heads * d, h, std=0.3), a + "k_proj.weight": w(kv * d, h, std=0.3),
                        a + "v_proj.weight": w(kv * d, h), a + "o_proj.weight": w(h, heads * d),
                        a + "o_gate.weight": w(heads * d, h)})
        else:
            lk = cfg["lightning_nkv"]
            out.update({a + "q_proj.weight": w(heads * d, h), a + "k_proj.weight": w(lk * d, h),
                        a + "v_proj.weight": w(lk * d, h), a + "o_proj.weight": w(h, heads * d),
                        a + "z_proj.weight": w(heads * d, h), a + "q_norm.weight": norm(d),
                        a + "k_norm.weight": norm(d), a + "o_norm.weight": norm(heads * d)})
    return out


def make_sala_checkpoint(out: Path, seed: int = 0, tokenizer_from: Path | None = None, **config) -> Path:
    """A tiny random MiniCPM-SALA checkpoint in ``out`` (config.json, model.safetensors, tokenizer if given)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**sala_config(**{k: v for k, v in config.items() if k in ("vocab_size", "mixers")}),
           **{k: v for k, v in config.items() if k not in ("vocab_size", "mixers")}}
    save_file(sala_weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
                (out / f.name).write_bytes(f.read_bytes())
    return out


# ---------------------------------------------------------------------------------------------------------------
# The released forward, from DESIGN §5
# ---------------------------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    """x [T, H, D]: rotate-half RoPE at positions 0..T-1."""
    t, _, d = x.shape
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
    ang = torch.arange(t, dtype=x.dtype)[:, None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def released_logits(ckpt: Path, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] (fp64) of the checkpoint at ``ckpt`` on one sequence of token ids."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(Path(ckpt) / "model.safetensors")).items()}
    n, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    d, kv, eps, t = hidden // heads, cfg["num_key_value_heads"], cfg["rms_norm_eps"], len(ids)
    residual = cfg["scale_depth"] / math.sqrt(n)
    h = w["model.embed_tokens.weight"][torch.tensor(ids)] * cfg["scale_emb"]
    for i, mixer in enumerate(cfg["mixer_types"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        x = _rms(h, w[p + "input_layernorm.weight"], eps)
        q, k, v = (x @ w[a + name + ".weight"].T for name in ("q_proj", "k_proj", "v_proj"))
        if mixer == "minicpm4":
            o = infllmv2_naive(q.view(t, heads, d), k.view(t, kv, d), v.view(t, kv, d),
                               **{key: val for key, val in cfg["sparse_config"].items() if key != "use_nope"},
                               normalizer="coarse", dense_len_mode="sequence", local_blocks="block")
            o = o.reshape(t, heads * d) * torch.sigmoid(x @ w[a + "o_gate.weight"].T)
        else:
            lk = cfg["lightning_nkv"]
            q = _rope(_rms(q.view(t, heads, d), w[a + "q_norm.weight"], eps), cfg["rope_theta"])
            k = _rope(_rms(k.view(t, lk, d), w[a + "k_norm.weight"], eps), cfg["rope_theta"])
            k = k.repeat_interleave(heads // lk, 1)
            v = v.view(t, lk, d).repeat_interleave(heads // lk, 1)
            slopes = torch.tensor([2.0 ** (-8.0 * (j + 1) / heads) for j in range(heads)], dtype=torch.float64)
            o = lightning_naive(q[None], k[None], v[None], slopes, scale=d**-0.5)[0][0].reshape(t, heads * d)
            o = _rms(o, w[a + "o_norm.weight"], eps) * torch.sigmoid(x @ w[a + "z_proj.weight"].T)
        h = h + (o @ w[a + "o_proj.weight"].T) * residual
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + ((torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T) * residual
    h = _rms(h, w["model.norm.weight"], eps)
    return (h / (hidden / cfg["dim_model_base"])) @ w["lm_head.weight"].T
