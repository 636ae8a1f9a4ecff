"""MiniCPM-SALA (``model_type`` "minicpm_sala"): the released hybrid read as salatrain's hybrid (DESIGN §5).

mixer_types "minicpm4" → sparse_attention, "lightning-attn" (or "lightning", "lightning_attn") → linear_attention:
the checkpoint keeps its own layer mix. Weights keep their names except the sparse layers' output gate,
``self_attn.o_gate`` → ``self_attn.g_proj``. Sparse settings are the checkpoint's ``sparse_config`` under the
released selection rules (dense_len_mode=sequence, local_blocks=block, coarse normaliser); sparse layers use RoPE
only with ``attn_use_rope``, Lightning layers with ``lightning_use_rope``. μP as MiniCPM4, with the released
defaults (scale_emb 12, scale_depth 1.4, dim_model_base 256) for absent keys. Entries salatrain does not model
(``mup_denominator``, ``sparse_config.use_nope``, ``torch_dtype``, ...) travel in ``imported_config_extra`` for the
way back. A checkpoint the hybrid cannot express is refused with what does not fit.
"""

from __future__ import annotations

import math

from .base import Family, llama_like, rope_parameters

SPARSE_MIXER = "minicpm4"
LIGHTNING_MIXERS = ("lightning-attn", "lightning", "lightning_attn")
RENAMES = ((".self_attn.o_gate.", ".self_attn.g_proj."),)
SPARSE_KEYS = ("block_size", "kernel_size", "kernel_stride", "init_blocks", "topk", "window_size", "dense_len")
RELEASED_SPARSE = {"block_size": 64, "kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "topk": 64,
                   "window_size": 2048, "dense_len": 8192}
RELEASED_RULES = {"normalizer": "coarse", "dense_len_mode": "sequence", "local_blocks": "block"}
MUP_DEFAULTS = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256}
# config.json entries the hybrid models (derived again on export); everything else is kept verbatim.
MODELLED = (
    "model_type", "architectures", "auto_map", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "scale_emb", "scale_depth", "dim_model_base", "mixer_types",
    "sparse_config", "attention_bias", "attn_use_rope", "attn_use_output_gate", "lightning_nh", "lightning_nkv",
    "lightning_head_dim", "lightning_scale", "lightning_use_rope", "qk_norm", "use_output_norm", "use_output_gate",
)


def mixer_type(name: str, i: int) -> str:
    if name == SPARSE_MIXER:
        return "sparse_attention"
    if name in LIGHTNING_MIXERS:
        return "linear_attention"
    raise ValueError(f"mixer_types[{i}] = {name!r} is not a MiniCPM-SALA mixer ({SPARSE_MIXER!r} or "
                     f"{', '.join(map(repr, LIGHTNING_MIXERS))})")


def unsupported(hf: dict) -> list[str]:
    """What in a minicpm_sala config.json salatrain's hybrid cannot express (empty: it fits)."""
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    mixers = hf.get("mixer_types") or []
    lightning = any(m != SPARSE_MIXER for m in mixers)
    out = []
    if len(mixers) != hf["num_hidden_layers"]:
        out.append(f"mixer_types has {len(mixers)} entries for {hf['num_hidden_layers']} layers")
    if hf.get("attention_bias", False):
        out.append("attention_bias=true (biases on every projection and gate)")
    if head_dim != hidden // heads:
        out.append(f"head_dim={head_dim} != hidden_size/num_attention_heads={hidden // heads} (the sparse layers "
                   "would use the latter)")
    for key, want in (("lightning_nh", heads), ("lightning_nkv", heads), ("lightning_head_dim", head_dim)):
        if hf.get(key) not in (None, want):
            out.append(f"{key}={hf[key]} (salatrain's Lightning layers have {want})")
    for key in ("qk_norm", "use_output_norm", "use_output_gate", "attn_use_output_gate"):
        if not hf.get(key, True):
            out.append(f"{key}=false")
    if hf.get("lightning_scale", "1/sqrt(d)") != "1/sqrt(d)":
        out.append(f"lightning_scale={hf['lightning_scale']!r} (salatrain scales by 1/sqrt(d))")
    if hf.get("attn_use_rope", False) and (hf.get("sparse_config") or {}).get("use_nope", False):
        out.append("attn_use_rope with sparse_config.use_nope (blocks selected without RoPE, attended with it)")
    if lightning and not math.log2(heads).is_integer():
        out.append(f"{heads} heads, not a power of two (the released Lightning decay slopes differ from 2^(-8h/H))")
    out += rope_unsupported(hf.get("rope_scaling"), hf.get("max_position_embeddings", 524288))
    return out


def rope_unsupported(scaling: dict | None, max_positions: int) -> list[str]:
    """RoPE both sides compute alike: none, or MiniCPM's longrope at its trained length."""
    if not scaling:
        return []
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind != "longrope":
        return [f"rope_scaling type {kind!r} (only none or longrope are computed alike)"]
    original = scaling.get("original_max_position_embeddings")
    if original != max_positions:
        return [f"longrope with max_position_embeddings={max_positions} != original_max_position_embeddings="
                f"{original} (the released code then applies the long factors at every length)"]
    return []


def _config(hf: dict) -> dict:
    bad = unsupported(hf)
    if bad:
        raise ValueError(f"this MiniCPM-SALA checkpoint does not fit salatrain's hybrid: {'; '.join(bad)}")
    hf = {**hf, "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]}
    hf.setdefault("max_position_embeddings", 524288)
    kw = llama_like(hf)
    kw["rope_parameters"] = rope_parameters(hf)
    kw["mixer_types"] = [mixer_type(m, i) for i, m in enumerate(hf["mixer_types"])]
    for key, default in MUP_DEFAULTS.items():
        kw[key] = type(default)(hf[key]) if hf.get(key) is not None else default
    source_sparse = hf.get("sparse_config") or {}
    kw["sparse_config"] = {**{k: source_sparse.get(k, v) for k, v in RELEASED_SPARSE.items()}, **RELEASED_RULES,
                           "use_rope": bool(hf.get("attn_use_rope", False))}
    kw["lightning_config"] = {"use_rope": bool(hf.get("lightning_use_rope", True))}
    extra = {k: v for k, v in hf.items() if k not in MODELLED}
    sparse_extra = {k: v for k, v in source_sparse.items() if k not in SPARSE_KEYS}
    if sparse_extra:
        extra["sparse_config"] = sparse_extra
    kw["imported_config_extra"] = extra
    return kw


FAMILY = Family(name="minicpm_sala", model_types=("minicpm_sala",), config_fn=_config, renames=RENAMES, hybrid=True)
