"""MiniCPM-SALA configuration (``model_type`` "minicpm_sala"), the released checkpoint schema.

Written by salatrain's exporter next to the weights; imports transformers only. Defaults are the released model's.
    mixer_types[i]      "minicpm4" (InfLLM-V2 sparse, NoPE unless attn_use_rope) or "lightning-attn" (also
                        "lightning", "lightning_attn")
    sparse_config       block_size, kernel_size, kernel_stride, init_blocks, topk, window_size, dense_len
    scale_emb, scale_depth, dim_model_base
                        μP: embeddings × scale_emb, residual branches × scale_depth/√L, logits of
                        hidden / (hidden_size / dim_model_base)
    lightning_*, qk_norm, use_output_norm, use_output_gate, attn_use_output_gate
                        the Lightning and sparse layers' options (this code implements the released values)
"""

from __future__ import annotations

from transformers import PretrainedConfig

SPARSE_DEFAULTS = {"block_size": 64, "kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "topk": 64,
                   "window_size": 2048, "dense_len": 8192, "use_nope": False}


class MiniCPMSALAConfig(PretrainedConfig):
    model_type = "minicpm_sala"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=73448,
        hidden_size=4096,
        intermediate_size=16384,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=2,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=524288,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.1,
        use_cache=True,
        scale_emb=12.0,
        scale_depth=1.4,
        dim_model_base=256,
        mup_denominator=32,
        mixer_types=None,
        sparse_config=None,
        attn_use_rope=False,
        attn_use_output_gate=True,
        lightning_nh=None,
        lightning_nkv=None,
        lightning_head_dim=None,
        lightning_scale="1/sqrt(d)",
        lightning_use_rope=True,
        qk_norm=True,
        use_output_norm=True,
        use_output_gate=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.scale_emb = scale_emb
        self.scale_depth = scale_depth
        self.dim_model_base = dim_model_base
        self.mup_denominator = mup_denominator
        self.mixer_types = list(mixer_types) if mixer_types is not None else ["minicpm4"] * num_hidden_layers
        self.sparse_config = {**SPARSE_DEFAULTS, **(sparse_config or {})}
        self.attn_use_rope = attn_use_rope
        self.attn_use_output_gate = attn_use_output_gate
        self.lightning_nh = lightning_nh if lightning_nh is not None else num_attention_heads
        self.lightning_nkv = lightning_nkv if lightning_nkv is not None else self.num_key_value_heads
        self.lightning_head_dim = lightning_head_dim if lightning_head_dim is not None else self.head_dim
        self.lightning_scale = lightning_scale
        self.lightning_use_rope = lightning_use_rope
        self.qk_norm = qk_norm
        self.use_output_norm = use_output_norm
        self.use_output_gate = use_output_gate
        kwargs.setdefault("pad_token_id", 2)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", [2, 73440])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["MiniCPMSALAConfig"]
