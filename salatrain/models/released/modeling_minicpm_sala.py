"""MiniCPM-SALA in plain PyTorch: the released model's math, for checkpoints in its released format.

Written by salatrain's exporter next to the weights; imports torch, transformers and the sibling configuration
only, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs anywhere (CPU included). The
attention is computed by reference code (no custom kernels): right, not fast.

Per layer: h += a · scale_depth/√L with a = mixer(RMSNorm(h)), then the same for the SwiGLU MLP. Embeddings ×
scale_emb; logits = lm_head(RMSNorm(h) / (hidden_size / dim_model_base)).
  Lightning ("lightning-attn"): q, k RMSNorm over head_dim, RoPE (rotate-half), K/V heads repeated to the query
      heads; per head S_t = λ_h S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t / √d with λ_h = exp(-slope_h) (ALiBi slopes),
      state fp32; output RMSNorm over all heads × σ(z_proj(x)), then o_proj.
  Sparse ("minicpm4", InfLLM-V2): NoPE (RoPE with attn_use_rope), GQA softmax attention, × σ(o_gate(x)), o_proj.
      A sequence whose keys number at least dense_len selects blocks for every query: compressed keys (mean over
      kernel_size tokens every kernel_stride), window scores exp(q·k_cmp/√d − lse) with the normaliser lse taken
      over a 4× coarser compression, summed over the query heads of a KV group; block score = max over the windows
      overlapping the block; the init blocks and the query's block with the window_size/block_size blocks before
      it are always kept; the topk + window_size/block_size best blocks (ties: lower index) are attended, causal
      inside the query's block. Shorter sequences attend densely.

Legend: B batch, T new tokens, Tk keys, H query heads, HKV key/value heads, D head dim, J compressed windows,
NB blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_minicpm_sala import MiniCPMSALAConfig

# transformers renamed the cache field of model outputs from `past_key_values` to `cache` (5.2x).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
SPARSE = "minicpm4"
LIGHTNING = ("lightning-attn", "lightning", "lightning_attn")
QUERY_ROWS = 256  # sparse selection processes this many queries at a time (bounds its memory)


# ------------------------------------------------------------------------------------------------------------
# Norm, RoPE, decay
# ------------------------------------------------------------------------------------------------------------


class MiniCPMSALARMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope_tables(config: MiniCPMSALAConfig, positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D] fp32 for ``positions`` [B, T]. Plain RoPE, or MiniCPM's longrope: frequencies divided by
    the long factors when the cached length (max(max_position_embeddings, positions + 1)) exceeds the original
    length, else by the short ones, and cos/sin × sqrt(1 + log(max/original) / log(original))."""
    rp = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = rp.get("rope_type") or rp.get("type") or "default"
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    scale = 1.0
    if kind == "longrope":
        original = rp["original_max_position_embeddings"]
        cached = max(config.max_position_embeddings, int(positions.max()) + 1)
        factors = rp["long_factor"] if cached > original else rp["short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32, device=positions.device)
        scale = math.sqrt(1 + math.log(config.max_position_embeddings / original) / math.log(original))
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not implemented by this modeling file")
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x_BTHD.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos[:, :, None] + rotated * sin[:, :, None]).to(x_BTHD.dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head decay rates: 2^(-8h/H) for h = 1..H when H is a power of two (ALiBi's interleaving otherwise)."""
    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two(num_heads))
    base = 2 ** math.floor(math.log2(num_heads))
    return torch.tensor(power_of_two(base) + alibi_slopes(2 * base).tolist()[0::2][: num_heads - base])


# ------------------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------------------


class MiniCPMSALACache:
    """Decoding state: keys/values of the sparse layers, the fp32 Lightning state of the others."""

    is_compileable = False

    def __init__(self, config: MiniCPMSALAConfig):
        n = config.num_hidden_layers
        self.keys: list = [None] * n
        self.values: list = [None] * n
        self.states: list = [None] * n
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[i] is not None:
            k, v = torch.cat([self.keys[i], k], 1), torch.cat([self.values[i], v], 1)
        self.keys[i], self.values[i] = k, v
        return k, v

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.keys, self.values, self.states):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))


# ------------------------------------------------------------------------------------------------------------
# Lightning attention
# ------------------------------------------------------------------------------------------------------------


def lightning_attention(q, k, v, slopes, scale, state, chunk: int = 64):
    """q, k, v [B, T, H, D] fp32, slopes [H], state [B, H, D, D] fp32 or None → (o [B, T, H, D], final state)."""
    b, t, h, d = q.shape
    state = q.new_zeros(b, h, d, v.shape[-1]) if state is None else state
    s = slopes.to(q.device, torch.float32).view(1, h, 1, 1)
    outs = []
    for a in range(0, t, chunk):
        qc, kc, vc = (x[:, a : a + chunk].transpose(1, 2) for x in (q, k, v))  # [B, H, L, D]
        n = qc.shape[2]
        i = torch.arange(n, device=q.device, dtype=torch.float32)
        gap = i.view(-1, 1) - i.view(1, -1)
        mask = torch.exp(-s * gap.clamp(min=0)) * (gap >= 0)
        intra = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
        inter = (qc * torch.exp(-s * (i + 1).view(-1, 1))) @ state
        outs.append(((intra + inter) * scale).transpose(1, 2))
        state = torch.exp(-s * n) * state + (kc * torch.exp(-s * (n - 1 - i).view(-1, 1))).transpose(-1, -2) @ vc
    return torch.cat(outs, 1), state


class LightningAttention(nn.Module):
    def __init__(self, config: MiniCPMSALAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        h, d, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
        self.num_heads, self.num_kv, self.head_dim = h, config.lightning_nkv, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, h * d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv * d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, hidden, bias=bias)
        self.z_proj = nn.Linear(hidden, h * d, bias=bias)
        self.q_norm = MiniCPMSALARMSNorm(d, config.rms_norm_eps)
        self.k_norm = MiniCPMSALARMSNorm(d, config.rms_norm_eps)
        self.o_norm = MiniCPMSALARMSNorm(h * d, config.rms_norm_eps)

    def forward(self, x, positions, mask, cache):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv, self.head_dim))
        v = self.v_proj(x).view(b, t, self.num_kv, self.head_dim)
        if self.config.lightning_use_rope:
            cos, sin = rope_tables(self.config, positions, self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.num_heads // self.num_kv
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        if mask is not None:  # left padding: the state stays zero until a row's first token
            real = mask[:, -t:, None, None].to(torch.bool)
            k, v = k.masked_fill(~real, 0.0), v.masked_fill(~real, 0.0)
        state = cache.states[self.layer_idx] if cache is not None else None
        o, state = lightning_attention(q.float(), k.float(), v.float(), alibi_slopes(self.num_heads),
                                       self.head_dim**-0.5, state)
        if cache is not None:
            cache.states[self.layer_idx] = state
        o = self.o_norm(o.to(x.dtype).flatten(2)) * torch.sigmoid(self.z_proj(x))
        return self.o_proj(o)


# ------------------------------------------------------------------------------------------------------------
# InfLLM-V2 sparse attention
# ------------------------------------------------------------------------------------------------------------


def compress(k: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of k [Tk, HKV, D] over [j·stride, j·stride + size): ([HKV, J, D], last token of each window [J])."""
    n = (k.shape[0] - size) // stride + 1 if k.shape[0] >= size else 0
    if n == 0:
        return k.new_zeros(k.shape[1], 0, k.shape[2]).float(), torch.zeros(0, dtype=torch.long, device=k.device)
    windows = k.float().unfold(0, size, stride)[:n]  # [J, HKV, D, size]
    ends = torch.arange(n, device=k.device) * stride + size - 1
    return windows.mean(-1).transpose(0, 1), ends


def visible_keys(q, k, pos, sc: dict, scale: float) -> torch.Tensor:
    """Keys each query may attend to under block selection: q [Tq, H, D] at positions ``pos`` [Tq], k [Tk, HKV, D]
    → bool [HKV, Tq, Tk]."""
    tq, h, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    bs, ks, st = sc["block_size"], sc["kernel_size"], sc["kernel_stride"]
    k_cmp, ends = compress(k, ks, st)
    k_coarse, coarse_ends = compress(k, 4 * ks, 4 * st)
    qg = q.float().view(tq, hkv, h // hkv, d).permute(1, 2, 0, 3)  # [HKV, G, Tq, D]
    done = ends.view(1, -1) <= pos.view(-1, 1)  # [Tq, J]
    logits = (qg @ k_cmp.unsqueeze(1).transpose(-1, -2)) * scale
    coarse = (qg @ k_coarse.unsqueeze(1).transpose(-1, -2)) * scale
    coarse = coarse.masked_fill(coarse_ends.view(1, -1) > pos.view(-1, 1), float("-inf"))
    lse = torch.logsumexp(coarse, -1, keepdim=True) if coarse.shape[-1] else coarse.new_full((*coarse.shape[:-1], 1), float("-inf"))
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # no coarse window yet: every score is 0
    window = torch.exp(logits - lse).nan_to_num(0.0).sum(1).masked_fill(~done, float("-inf"))  # [HKV, Tq, J]
    nb = math.ceil(tk / bs)
    blocks = torch.arange(nb, device=q.device)
    starts = ends - ks + 1
    overlap = (starts.view(-1, 1) <= blocks.view(1, -1) * bs + bs - 1) & (ends.view(-1, 1) >= blocks.view(1, -1) * bs)
    score = window.unsqueeze(-1).masked_fill(~overlap, float("-inf")).amax(-2) if len(ends) else \
        window.new_full((hkv, tq, nb), float("-inf"))
    cur = (pos // bs).view(-1, 1)
    local = (blocks.view(1, -1) >= cur - sc["window_size"] // bs) & (blocks.view(1, -1) <= cur)
    future = blocks.view(1, -1) > cur
    score = score.masked_fill(local | (blocks.view(1, -1) < sc["init_blocks"]), float("inf"))
    score = score.masked_fill(future, float("-inf"))
    budget = min(nb, sc["topk"] + sc["window_size"] // bs)
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :budget]
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True) & ~future
    keys = chosen.repeat_interleave(bs, -1)[..., :tk]
    return keys & (torch.arange(tk, device=q.device).view(1, -1) <= pos.view(-1, 1))


def attend_row(q, k, v, sparse: bool, sc: dict, scale: float) -> torch.Tensor:
    """One sequence: q [Tq, H, D] are the last Tq of the keys k, v [Tk, HKV, D] → o [Tq, H, D]."""
    tq, h, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    pos = torch.arange(tk - tq, tk, device=q.device)
    g = h // hkv
    qg = q.view(tq, hkv, g, d).permute(1, 2, 0, 3)  # [HKV, G, Tq, D]
    kk, vv = k.permute(1, 0, 2).unsqueeze(1), v.permute(1, 0, 2).unsqueeze(1)  # [HKV, 1, Tk, D]
    outs = []
    for a in range(0, tq, QUERY_ROWS):
        p = pos[a : a + QUERY_ROWS]
        if sparse:
            allowed = visible_keys(q[a : a + QUERY_ROWS], k, p, sc, scale).unsqueeze(1)  # [HKV, 1, rows, Tk]
        else:
            allowed = torch.arange(tk, device=q.device).view(1, -1) <= p.view(-1, 1)
        outs.append(F.scaled_dot_product_attention(qg[:, :, a : a + QUERY_ROWS], kk, vv, attn_mask=allowed,
                                                    scale=scale))
    return torch.cat(outs, 2).permute(2, 0, 1, 3).reshape(tq, h, d)


class SparseAttention(nn.Module):
    def __init__(self, config: MiniCPMSALAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = config
        h, hidden = config.num_attention_heads, config.hidden_size
        d = hidden // h
        self.num_heads, self.num_kv, self.head_dim = h, config.num_key_value_heads, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(hidden, h * d, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv * d, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, hidden, bias=bias)
        self.o_gate = nn.Linear(hidden, h * d, bias=bias)

    def forward(self, x, positions, mask, cache):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv, self.head_dim)
        if self.config.attn_use_rope:
            cos, sin = rope_tables(self.config, positions, self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)
        sc = self.config.sparse_config
        sparse = int(positions.max()) + 1 >= sc["dense_len"]  # per sequence, as the released code decides
        o = torch.zeros_like(q)
        for r in range(b):
            real = mask[r].bool() if mask is not None else torch.ones(k.shape[1], dtype=torch.bool, device=x.device)
            rows = min(t, int(real.sum()))
            if rows:
                o[r, t - rows :] = attend_row(q[r, t - rows :], k[r][real], v[r][real], sparse, sc,
                                              self.head_dim**-0.5)
        o = o.flatten(2) * torch.sigmoid(self.o_gate(x))
        return self.o_proj(o)


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------


class MiniCPMSALAMLP(nn.Module):
    def __init__(self, config: MiniCPMSALAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MiniCPMSALADecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMSALAConfig, layer_idx: int):
        super().__init__()
        mixer = config.mixer_types[layer_idx]
        if mixer == SPARSE:
            self.self_attn = SparseAttention(config, layer_idx)
        elif mixer in LIGHTNING:
            self.self_attn = LightningAttention(config, layer_idx)
        else:
            raise ValueError(f"mixer_types[{layer_idx}] = {mixer!r}: expected {SPARSE!r} or one of {LIGHTNING}")
        self.mlp = MiniCPMSALAMLP(config)
        self.input_layernorm = MiniCPMSALARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMSALARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, h, positions, mask, cache):
        h = h + self.self_attn(self.input_layernorm(h), positions, mask, cache) * self.residual_scale
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale


class MiniCPMSALAPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMSALAConfig
    config: MiniCPMSALAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MiniCPMSALADecoderLayer"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # keys/values and Lightning states live in MiniCPMSALACache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, MiniCPMSALARMSNorm):
            nn.init.ones_(module.weight)


class MiniCPMSALAModel(MiniCPMSALAPreTrainedModel):
    def __init__(self, config: MiniCPMSALAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniCPMSALADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniCPMSALARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h = h * self.config.scale_emb
        b, t = h.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = MiniCPMSALACache(self.config)
        past = cache.seen_tokens if cache is not None else 0
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if position_ids is None:
            if mask is not None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=h.device).view(1, t).expand(b, t)
        for layer in self.layers:
            h = layer(h, position_ids, mask, cache)
        if cache is not None:
            cache.seen_tokens += t
        out = BaseModelOutputWithPast(last_hidden_state=self.norm(h))
        out[_CACHE_FIELD] = cache
        return out


class MiniCPMSALAForCausalLM(MiniCPMSALAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniCPMSALAConfig):
        super().__init__(config)
        self.model = MiniCPMSALAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h / (self.config.hidden_size / self.config.dim_model_base)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits)
        result[_CACHE_FIELD] = out[_CACHE_FIELD]
        return result

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = MiniCPMSALACache(self.config)
        seen = cache.seen_tokens if cache is not None else 0
        inputs = {"use_cache": use_cache, "attention_mask": attention_mask, "cache": cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if attention_mask is not None:
            new = inputs["input_ids"].shape[1] if "input_ids" in inputs else inputs_embeds.shape[1]
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache


__all__ = ["MiniCPMSALAForCausalLM", "MiniCPMSALAModel", "MiniCPMSALAPreTrainedModel", "MiniCPMSALACache"]
