"""Weight transfer from a dense attention layer to a Lightning or InfLLM-V2 layer (DESIGN §2).

Input and output dicts are keyed by parameter name inside ``self_attn`` (``q_proj.weight``, ...).

Lightning: Q/K/V/O copied; GQA K/V heads repeated (repeat_interleave) to one per query head; q/k RMSNorm
weights copied when the base has them (Qwen3) else ones; output RMSNorm ones; the new gate W_z = 0 so
σ(W_z x) = ½, and o_proj is doubled so the gate is an exact identity at conversion.
InfLLM-V2: Q/K/V/O unchanged (GQA kept, no new selection parameters); the new gate W_g = 0 with o_proj
doubled, so at conversion the layer equals the dense layer without RoPE (or with it, if kept).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models import SalaHybridForCausalLM
from ..models.configuration_sala_hybrid import SalaHybridConfig

INIT_NOTES = {
    "linear_attention": {
        "q_proj, o_proj": "copied from the dense layer (o_proj ×2, see z_proj)",
        "k_proj, v_proj": "copied; GQA heads repeated to one K/V head per query head (repeat_interleave ×G)",
        "q_norm, k_norm": "copied from the base q_norm/k_norm when present, else ones",
        "o_norm": "ones (RMSNorm over all heads)",
        "z_proj": "zeros: σ(0) = ½, compensated by o_proj ×2, so the gate is an identity at conversion",
        "decay": "fixed per head s_h = 2^(-8h/H), not trained",
    },
    "sparse_attention": {
        "q_proj, k_proj, v_proj": "copied unchanged (GQA kept; no extra parameters for block selection)",
        "o_proj": "copied ×2 (see g_proj)",
        "g_proj": "zeros: σ(0) = ½, compensated by o_proj ×2, so the layer equals the dense one at conversion",
        "position encoding": "RoPE removed (NoPE) unless sparse.use_rope=true",
    },
    "full_attention": {"all": "copied unchanged"},
}


def _repeat_heads(w: torch.Tensor, num_kv_heads: int, groups: int) -> torch.Tensor:
    """[HKV·D, ...] → [HKV·G·D, ...], each KV head repeated G times in place (repeat_interleave)."""
    shape = w.shape
    w = w.reshape(num_kv_heads, shape[0] // num_kv_heads, *shape[1:])
    return w.repeat_interleave(groups, dim=0).reshape(shape[0] * groups, *shape[1:])


def transfer_attention(mixer: str, dense: dict[str, torch.Tensor], cfg: SalaHybridConfig) -> dict[str, torch.Tensor]:
    """Parameters of the ``mixer`` layer built from the dense layer's ``self_attn`` parameters."""
    if mixer == "full_attention":
        return dict(dense)
    out = {k: v for k, v in dense.items() if k.startswith(("q_proj.", "k_proj.", "v_proj.", "o_proj."))}
    out["o_proj.weight"] = dense["o_proj.weight"] * 2
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    ref = dense["q_proj.weight"]
    if mixer == "sparse_attention":
        if cfg.qk_norm:
            out["q_norm.weight"], out["k_norm.weight"] = dense["q_norm.weight"], dense["k_norm.weight"]
        out["g_proj.weight"] = torch.zeros(hq * d, cfg.hidden_size, dtype=ref.dtype)
        return out
    if mixer != "linear_attention":
        raise ValueError(f"unknown mixer type {mixer!r}")
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        if name in dense:
            out[name] = _repeat_heads(dense[name], hkv, hq // hkv)
    ones = torch.ones(d, dtype=ref.dtype)
    out["q_norm.weight"] = dense.get("q_norm.weight", ones)
    out["k_norm.weight"] = dense.get("k_norm.weight", ones.clone())
    out["o_norm.weight"] = torch.ones(hq * d, dtype=ref.dtype)
    out["z_proj.weight"] = torch.zeros(hq * d, cfg.hidden_size, dtype=ref.dtype)
    return out


# A hybrid source (MiniCPM-SALA) keeps each layer's own mixer, or turns a sparse layer into a Lightning one.
RETARGET_NOTES = {
    ("sparse_attention", "sparse_attention"): {"all": "copied from the source's sparse layer (o_gate → g_proj)"},
    ("linear_attention", "linear_attention"): {"all": "copied from the source's Lightning layer"},
    ("sparse_attention", "linear_attention"): {
        "q_proj, o_proj": "copied from the source's sparse layer",
        "k_proj, v_proj": "copied; GQA heads repeated to one K/V head per query head (repeat_interleave ×G)",
        "z_proj": "the sparse layer's output gate g_proj (same role: σ(W x) on the attention output)",
        "q_norm, k_norm, o_norm": "ones",
        "decay": "fixed per head s_h = 2^(-8h/H), not trained",
    },
}


def check_retarget(source_mixers: list[str], plan: list[str]) -> None:
    """Refuse layer changes the weights cannot make (a Lightning or sparse layer of a hybrid source becoming a
    full_attention layer, a Lightning layer becoming sparse), naming the layers."""
    bad = [f"{i}: {a} → {b}" for i, (a, b) in enumerate(zip(source_mixers, plan))
           if a != "full_attention" and (a, b) not in RETARGET_NOTES]
    if bad:
        raise UserError(f"the plan asks for layer changes this checkpoint's weights cannot make ({', '.join(bad[:4])}"
                        f"{' ...' if len(bad) > 4 else ''}); a hybrid source keeps its layers or turns sparse layers "
                        "into Lightning ones")


def retarget_attention(source_mixer: str, mixer: str, params: dict[str, torch.Tensor],
                       cfg: SalaHybridConfig) -> dict[str, torch.Tensor]:
    """The ``mixer`` layer's parameters from a ``source_mixer`` layer's (hybrid names, inside ``self_attn``)."""
    if source_mixer == "full_attention":
        return transfer_attention(mixer, params, cfg)
    if source_mixer == mixer:
        return dict(params)
    if (source_mixer, mixer) != ("sparse_attention", "linear_attention"):
        raise ValueError(f"cannot turn a {source_mixer} layer into {mixer}")
    d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    out = {k: v for k, v in params.items() if k.startswith(("q_proj.", "o_proj."))}
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        if name in params:
            out[name] = _repeat_heads(params[name], hkv, hq // hkv)
    ref = params["q_proj.weight"]
    out["z_proj.weight"] = params["g_proj.weight"]
    out["q_norm.weight"] = torch.ones(d, dtype=ref.dtype)
    out["k_norm.weight"] = torch.ones(d, dtype=ref.dtype)
    out["o_norm.weight"] = torch.ones(hq * d, dtype=ref.dtype)
    return out


def init_notes(source_mixers: list[str], plan: list[str]) -> dict:
    """How each kind of layer of the output was initialised (conversion_report.json)."""
    notes = {}
    for a, b in zip(source_mixers, plan):
        if a == "full_attention":
            notes[b] = INIT_NOTES[b]
        else:
            notes[b if a == b else f"{b} (from {a})"] = RETARGET_NOTES[(a, b)]
    return dict(sorted(notes.items()))


def meta_shapes(cfg: SalaHybridConfig) -> dict[str, tuple[int, ...]]:
    """The weight shapes a hybrid of config ``cfg`` has (lm_head left out when tied), from a model on the meta device."""
    with torch.device("meta"):
        model = SalaHybridForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes
