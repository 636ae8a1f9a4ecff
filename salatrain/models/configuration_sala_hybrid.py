"""Configuration of the salatrain hybrid model (Lightning linear attention + InfLLM-V2 sparse attention).

This file imports only torch-free transformers pieces so that it can be exported next to the weights and
loaded with ``trust_remote_code=True`` in a process where salatrain is not installed.

Per layer, ``mixer_types[i]`` is one of
    "linear_attention"  Lightning attention (RoPE, fixed per-head decay, output norm and sigmoid gate)
    "sparse_attention"  InfLLM-V2 block-sparse attention (NoPE by default, sigmoid output gate)
    "full_attention"    the base model's softmax attention, unchanged (its RoPE and sliding window kept)
"""

from __future__ import annotations

import math

from transformers.configuration_utils import PreTrainedConfig

MIXER_TYPES = ("linear_attention", "sparse_attention", "full_attention")

SPARSE_DEFAULTS = {
    "block_size": 64,
    "kernel_size": 32,
    "kernel_stride": 16,
    "init_blocks": 1,
    "topk": 64,
    "window_size": 2048,
    "dense_len": 8192,
    "normalizer": "exact",  # "exact" softmax normaliser or InfLLM-V2's "coarse" (kernel 128 / stride 64)
    "dense_len_mode": "position",  # sparse iff the query's position >= dense_len; "sequence": iff the keys so far do
    "local_blocks": "token",  # local window of the last window_size tokens; "block": query block + window/block before
    "use_rope": False,  # HyPE: NoPE in sparse layers; True keeps the base RoPE (short conversions)
    "nope_logit_scale": False,  # HALO: scale logits by log(t + a) / log(a) at positions t
    "nope_logit_scale_base": 500.0,
    # Triton kernels only, the same output: that many neighbouring sparse queries walk the union of their chosen
    # blocks, loading each once. 1 for a config that does not say; `salatrain convert` writes
    # default_share_tokens(topk) into a new conversion's config.json instead
    "share_tokens": 1,
}

SHARE_TOKENS = (1, 2, 4, 8, 16)  # the kernels' tile rows are share_tokens x the group padded to a power of two
SHARE_TOKENS_MIN_TOPK = 64


def default_share_tokens(topk: int) -> int:
    """share_tokens of a new conversion that neither the user nor the source sets: 4 where lists are long (topk >=
    64: 12-29% faster sparse fwd+bwd on SmolLM2-135M's own q/k at 32K with SALA's settings, H200), 1 where they are
    short (topk 16: 0.74-0.96x the speed at 16K). docs/perf.md, "Block sharing on a real model's q/k". A model with
    fewer than 16 query heads per K/V head packs neighbours into each tile at 1 too (docs/perf.md, "Small groups")."""
    return 4 if topk >= SHARE_TOKENS_MIN_TOPK else 1


SPARSE_CHOICES = {
    "normalizer": ("exact", "coarse"),
    "dense_len_mode": ("position", "sequence"),
    "local_blocks": ("token", "block"),
}

LIGHTNING_DEFAULTS = {
    "chunk_size": 64,
    "use_rope": True,
    "norm_eps": None,  # None: the base model's rms_norm_eps
}


def sparse_config_problem(sc: dict) -> str | None:
    """What is wrong with an InfLLM-V2 ``sparse_config`` (sizes positive, windows covering every key,
    known normaliser and selection rules), or None."""
    for key in ("block_size", "kernel_size", "kernel_stride", "topk"):
        if not isinstance(sc[key], int) or isinstance(sc[key], bool) or sc[key] < 1:
            return f"sparse_config {key} must be an integer >= 1 (got {sc[key]!r})"
    for key in ("init_blocks", "window_size", "dense_len"):
        if not isinstance(sc[key], int) or isinstance(sc[key], bool) or sc[key] < 0:
            return f"sparse_config {key} must be an integer >= 0 (got {sc[key]!r})"
    if sc["kernel_stride"] > sc["kernel_size"]:
        return (f"sparse_config kernel_stride={sc['kernel_stride']} exceeds kernel_size={sc['kernel_size']}: "
                "compressed windows would skip keys")
    if sc["init_blocks"] > sc["topk"]:
        return f"sparse_config init_blocks={sc['init_blocks']} exceeds topk={sc['topk']} (topk includes them)"
    for key, allowed in SPARSE_CHOICES.items():
        if sc[key] not in allowed:
            return f"sparse_config {key} must be {' or '.join(allowed)} (got {sc[key]!r})"
    if sc["share_tokens"] not in SHARE_TOKENS or isinstance(sc["share_tokens"], bool):
        allowed = ", ".join(map(str, SHARE_TOKENS))
        return f"sparse_config share_tokens must be one of {allowed} (got {sc['share_tokens']!r})"
    if not sc["nope_logit_scale_base"] > 1:
        return f"sparse_config nope_logit_scale_base must be > 1 (got {sc['nope_logit_scale_base']!r})"
    return None


# transformers' own dataclass machinery (strict validation) is used when available (>= 5.0).
try:
    from huggingface_hub.dataclasses import strict as _strict
except ImportError:  # pragma: no cover - very old huggingface_hub
    def _strict(cls=None, **_):
        return cls if cls is not None else (lambda c: c)


@_strict
class SalaHybridConfig(PreTrainedConfig):
    r"""Hybrid decoder: every layer is RMSNorm → mixer → residual → RMSNorm → SwiGLU MLP → residual.

    Base-model fields follow transformers' Llama naming. Family quirks:
        qkv_bias / o_bias         Qwen2 (q/k/v bias), Llama ``attention_bias`` (all four)
        qk_norm                   Qwen3 per-head RMSNorm on q and k before RoPE
        sliding_windows           per-layer window for ``full_attention`` layers (Mistral/Qwen), None = global
        scale_emb, scale_depth, dim_model_base
                                  MiniCPM μP: embeddings × scale_emb, residual branches ×
                                  scale_depth/sqrt(num_layers), logits of hidden/(hidden_size/dim_model_base)
        imported_config_extra     config.json entries of an imported checkpoint (MiniCPM-SALA) that the hybrid
                                  does not model, written back unchanged when exporting to that format
    """

    model_type = "sala_hybrid"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: list | None = None
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: int | None = None
    mixer_types: list | None = None
    sparse_config: dict | None = None
    lightning_config: dict | None = None
    base_model_type: str = "llama"
    imported_config_extra: dict | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mixer_types is None:
            self.mixer_types = ["full_attention"] * self.num_hidden_layers
        if self.sliding_windows is None:
            self.sliding_windows = [None] * self.num_hidden_layers
        self.sparse_config = {**SPARSE_DEFAULTS, **(self.sparse_config or {})}
        self.lightning_config = {**LIGHTNING_DEFAULTS, **(self.lightning_config or {})}
        if self.rope_parameters is None and "rope_theta" not in kwargs and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        n = self.num_hidden_layers
        if len(self.mixer_types) != n:
            raise ValueError(f"mixer_types has {len(self.mixer_types)} entries for {n} layers")
        bad = sorted({m for m in self.mixer_types if m not in MIXER_TYPES})
        if bad:
            raise ValueError(f"unknown mixer type(s) {bad}; expected one of {list(MIXER_TYPES)}")
        if len(self.sliding_windows) != n:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries for {n} layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        unknown = set(self.sparse_config) - set(SPARSE_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown sparse_config key(s) {sorted(unknown)}; known: {sorted(SPARSE_DEFAULTS)}")
        problem = sparse_config_problem(self.sparse_config)
        if problem:
            raise ValueError(problem)
        chunk = self.lightning_config["chunk_size"]
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"lightning_config chunk_size must be an integer >= 1 (got {chunk!r})")
        unknown = set(self.lightning_config) - set(LIGHTNING_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown lightning_config key(s) {sorted(unknown)}; known: {sorted(LIGHTNING_DEFAULTS)}"
            )

    @property
    def residual_scale(self) -> float:
        """Multiplier of every residual branch (MiniCPM μP); 1.0 for other families."""
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_scale(self) -> float:
        """Hidden states are multiplied by this before the LM head (MiniCPM μP); 1.0 otherwise."""
        if self.dim_model_base is None:
            return 1.0
        return self.dim_model_base / self.hidden_size

    @property
    def lightning_decay(self) -> list[float]:
        """Per-head log-decay s_h = 2^(-8h/H), h = 1..H (λ_h = exp(-s_h))."""
        h = self.num_attention_heads
        return [2.0 ** (-8.0 * (i + 1) / h) for i in range(h)]


__all__ = ["SalaHybridConfig", "MIXER_TYPES", "SPARSE_DEFAULTS", "LIGHTNING_DEFAULTS", "default_share_tokens"]
