"""MiniCPM4: Llama weights with μP scales and LongRoPE.

embeddings × scale_emb; each residual branch × scale_depth / sqrt(num_layers) (when ``use_mup``, the default);
logits of hidden / (hidden_size / dim_model_base); RoPE ``longrope`` with short/long factors chosen by length,
cos/sin scaled by sqrt(1 + log(max_pos / original_max) / log(original_max)) — transformers' longrope formula.
MiniCPM4's own ``sparse_config`` (its InfLLM-V2 settings) is not carried over: salatrain's sparse settings
come from the conversion config. ``kv_channels`` is MiniCPM's name for head_dim.
"""

from .base import Family, llama_like


def _config(hf: dict) -> dict:
    hf = dict(hf)
    if hf.get("kv_channels"):
        hf["head_dim"] = hf["kv_channels"]
    kw = llama_like(hf)
    if hf.get("use_mup", True):
        kw["scale_emb"] = float(hf.get("scale_emb", 1.0))
        if hf.get("scale_depth") is not None:
            kw["scale_depth"] = float(hf["scale_depth"])
        if hf.get("dim_model_base") is not None:
            kw["dim_model_base"] = int(hf["dim_model_base"])
    return kw


FAMILY = Family(name="minicpm", model_types=("minicpm", "minicpm4"), config_fn=_config)
