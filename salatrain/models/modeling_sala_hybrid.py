"""The salatrain hybrid model: a decoder whose layers mix Lightning, InfLLM-V2 and softmax attention.

Imports torch and transformers only, so it can be exported next to the weights and loaded with
``trust_remote_code=True``. The PyTorch references of the two mixers are salatrain_kernels' ``naive.py``
modules; an exported checkpoint carries copies of them as ``lightning_attention.py`` and
``sparse_attention.py`` and imports those when salatrain_kernels is not installed. The Triton kernels of
``salatrain_kernels`` are used for CUDA tensors when that package is importable (after a one-time self-test
against the references).

Legend: B batch, T new tokens, Tk tokens incl. cached ones, H query heads, HKV key/value heads, D head dim.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .configuration_sala_hybrid import SalaHybridConfig

try:  # the mixers' PyTorch references, one module per op, and the kernels' block-geometry rule
    from salatrain_kernels.infllm_v2.naive import (all_visible_len, decode_sdpa_backends, dense_prefix_len,
                                                   grouped_sdpa, infllmv2_attn_torch, infllmv2_decode_torch)
    from salatrain_kernels.infllm_v2.params import triton_geometry_problem
    from salatrain_kernels.lightning.naive import lightning_attn_torch, lightning_step
except ModuleNotFoundError as e:  # an exported checkpoint without salatrain: the same files, copied next to this one
    if e.name != "salatrain_kernels":
        raise
    from .lightning_attention import lightning_attn_torch, lightning_step
    from .sparse_attention import (all_visible_len, decode_sdpa_backends, dense_prefix_len, grouped_sdpa,
                                   infllmv2_attn_torch, infllmv2_decode_torch)

    triton_geometry_problem = None

try:
    import salatrain_kernels as _kernels
except Exception:  # the exported model runs without the kernels
    _kernels = None

logger = logging.getLogger(__name__)

# Files written next to exported weights (name -> the module it is copied from); each imports only torch,
# transformers and its siblings. The references come from salatrain_kernels, or from this file's siblings in an
# exported checkpoint.
MODEL_FILES = {
    "configuration_sala_hybrid.py": SalaHybridConfig.__module__,
    "modeling_sala_hybrid.py": __name__,
    "lightning_attention.py": lightning_attn_torch.__module__,
    "sparse_attention.py": infllmv2_attn_torch.__module__,
    "decode_graphs.py": __name__.rpartition(".")[0] + ".decode_graphs",  # imported by generate, on CUDA
}
AUTO_MAP = {
    "AutoConfig": "configuration_sala_hybrid.SalaHybridConfig",
    "AutoModel": "modeling_sala_hybrid.SalaHybridModel",
    "AutoModelForCausalLM": "modeling_sala_hybrid.SalaHybridForCausalLM",
}


def copy_model_code(save_directory) -> None:
    out = Path(save_directory)
    for name, module in MODEL_FILES.items():
        source = Path(importlib.import_module(module).__file__)
        if source.resolve() != (out / name).resolve():
            shutil.copy2(source, out / name)


# transformers renamed the cache argument/output from `past_key_values` to `cache` in 5.2x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# Elementwise fusion: the small models this converts spend as much time in norms, RoPE and gates (a dozen
# memory-bound kernels each, forward and backward) as in their matmuls. ``set_fused_elementwise(True)`` (the
# trainer does it on CUDA) runs each of these functions as one torch.compile'd kernel pair for CUDA tensors;
# the math is the same code, so eager and fused agree to rounding.
# ----------------------------------------------------------------------------------------------------------------

_FUSE = {"on": False}


def set_fused_elementwise(on: bool) -> None:
    """Fuse the elementwise blocks (RMSNorm, RoPE, SwiGLU, sigmoid gates) with torch.compile on CUDA."""
    _FUSE["on"] = bool(on)


def _fusable(fn):
    compiled = []

    def run(*args):
        if _FUSE["on"] and args[0].is_cuda and compiled != [None]:
            if not compiled:
                compiled.append(torch.compile(fn, dynamic=True, fullgraph=True))
            try:
                return compiled[0](*args)
            except Exception as e:  # a toolchain that cannot compile: eager from now on, said once
                if torch.compiler.is_compiling():
                    raise
                logger.warning("%s: torch.compile failed (%s: %s); running it unfused", fn.__name__,
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                compiled[:] = [None]
        return fn(*args)

    run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn
    return run


@_fusable
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: weight · (x_fp32 · rsqrt(mean(x²) + eps)).to(dtype)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@_fusable
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@_fusable
def sigmoid_gate(o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return o * torch.sigmoid(gate)


@_fusable
def norm_sigmoid_gate(o: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor) -> torch.Tensor:
    return rms_norm.__wrapped__(o, weight, eps) * torch.sigmoid(gate)


class SalaRMSNorm(nn.Module):
    """RMSNorm in transformers' convention: weight · (x_fp32 · rsqrt(mean(x²) + eps)).to(dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.kernel_backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in eval mode without gradients (evaluation, decoding), one fused launch where the kernels run for the
        # eight torch ops (training keeps the reference: a checkpointed region's no-grad first pass included)
        if not self.training and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) \
                and x.dtype == self.weight.dtype \
                and _use_kernels(x, x, self.kernel_backend, "rms_norm", shape=(1, 1, x.shape[-1])):
            return _fused_ops().rms_norm(x, self.weight, self.variance_epsilon, backend="triton")
        return rms_norm(x, self.weight, self.variance_epsilon)


class SalaRotaryEmbedding(nn.Module):
    """The base model's RoPE (any transformers rope type, e.g. llama3 or MiniCPM's longrope)."""

    def __init__(self, config: SalaHybridConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: SalaHybridConfig, device=None, **_) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@_fusable
def apply_rope(x_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTD.unsqueeze(2), sin_BTD.unsqueeze(2)
    return x_BTHD * cos + rotate_half(x_BTHD) * sin


class SalaMLP(nn.Module):
    def __init__(self, config: SalaHybridConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu:
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class SeqInfo:
    """How the T new tokens sit in their sequences (built once per forward by the model).

    positions   [B, T] position of each token from the start of its document
    past_len    tokens of each row already in the cache
    cu_seqlens  [N+1] document boundaries when B = 1 holds packed documents, else None
    left_pad    [B] leading padding tokens of each row (batched generation), or None
    cu_host     the same boundaries (int32) on the host when the caller gave them there: what needs them as host
                numbers (the sparse kernels' layout) reads them without a synchronisation
    """

    positions: torch.Tensor
    past_len: int = 0
    cu_seqlens: torch.Tensor | None = None
    left_pad: torch.Tensor | None = None
    _max_doc_len: int | None = None
    cu_host: torch.Tensor | None = None

    @property
    def max_doc_len(self) -> int:
        """Length of the longest document (one host read per forward, shared by every layer)."""
        if self._max_doc_len is None:
            cu = self.cu_seqlens
            self._max_doc_len = int((cu[1:] - cu[:-1]).max()) if cu is not None else int(self.positions.shape[-1])
        return self._max_doc_len

    @property
    def cu_for_host(self) -> torch.Tensor | None:
        """The document bounds for work laid out on the host (reading them there): the host copy when there is
        one, so that nothing is read back from the device."""
        return self.cu_host if self.cu_host is not None else self.cu_seqlens


class SalaHybridCache:
    """Per-layer decoding state: K/V for softmax and sparse layers, the fp32 Lightning state for linear ones.

    ``keys[i]`` / ``values[i]`` are [B, T, HKV, D] views of buffers with room for ``KV_HEADROOM`` more tokens, so a
    decoding step writes its token in place instead of copying the whole cache (O(1) a token and layer, not O(T));
    a buffer that fills up is replaced by one with room again."""

    is_compileable = False
    KV_HEADROOM = 4096  # tokens of room past the cached ones (a new buffer, and one copy, every this many tokens)

    def __init__(self, config: SalaHybridConfig):
        n = config.num_hidden_layers
        self.mixer_types = list(config.mixer_types)
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.states: list[torch.Tensor | None] = [None] * n
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def append_kv(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[i], self.values[i]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):  # autograd: no in-place writes
            self._buffers[i] = None
            if old_k is not None:
                k, v = torch.cat([old_k, k], dim=1), torch.cat([old_v, v], dim=1)
            self.keys[i], self.values[i] = k, v
            return k, v
        n, t = (0 if old_k is None else old_k.shape[1]), k.shape[1]
        buf = self._buffers[i]
        if (buf is None or old_k is None or old_k.data_ptr() != buf[0].data_ptr() or n + t > buf[0].shape[1]
                or buf[0].shape[::2] != k.shape[::2] or buf[0].shape[3:] != k.shape[3:] or buf[0].dtype != k.dtype):
            # a new buffer: first append, full, or the views replaced (reorder_cache) or of another shape
            cap = n + t + self.KV_HEADROOM
            buf = (k.new_empty((k.shape[0], cap, *k.shape[2:])), v.new_empty((v.shape[0], cap, *v.shape[2:])))
            if n:
                buf[0][:, :n], buf[1][:, :n] = old_k, old_v
            self._buffers[i] = buf
        buf[0][:, n : n + t], buf[1][:, n : n + t] = k, v
        self.keys[i], self.values[i] = buf[0][:, : n + t], buf[1][:, : n + t]
        return self.keys[i], self.values[i]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.keys, self.values, self.states):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))


# ----------------------------------------------------------------------------------------------------------------
# Kernel dispatch
# ----------------------------------------------------------------------------------------------------------------

_checked: dict = {}


def _fused_ops():
    """salatrain_kernels' fused q/k-norm + RoPE and output-norm + gate kernels (Lightning mixer). Imported by
    name so transformers' remote-code import check does not require salatrain_kernels."""
    return importlib.import_module("salatrain_kernels.lightning.fused")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_kernels(q: torch.Tensor, k: torch.Tensor, backend: str, what: str, shape: tuple | None = None,
                 **options) -> bool:
    """True when the Triton kernels should run (CUDA tensors, salatrain_kernels importable, self-test passed
    for this device, dtype, head shape and `options`, the kernel's own ones the self-test takes). On CPU they run
    only when forced (backend 'triton') under Triton's interpreter (TRITON_INTERPRET=1). The first decision per
    kernel is logged."""
    on_device = q.is_cuda or (backend == "triton" and _interpreting())
    if backend == "torch" or _kernels is None or not on_device:
        if backend == "triton":
            raise RuntimeError(f"kernel backend 'triton' needs CUDA tensors and salatrain_kernels ({what})")
        if _kernels is None and q.is_cuda and ("missing", what) not in _checked:
            _checked[("missing", what)] = True
            logger.warning("%s: salatrain_kernels is not importable; using the PyTorch reference (slow)", what)
        return False
    # (query heads, K/V heads, head dim) of [B, T, H, D] q and k unless given
    heads = shape or (q.shape[2], k.shape[2], q.shape[3])
    shape = dict(num_heads=heads[0], num_kv_heads=heads[1], head_dim=heads[2])
    key = (what, q.device.type, q.device.index, q.dtype, tuple(shape.values()), tuple(sorted(options.items())))
    if key not in _checked:
        # raises on mismatch
        run_isolated(_kernels.self_test, what, device=q.device, dtype=q.dtype, **shape, **options)
        _checked[key] = True
        logger.info("%s: Triton kernels from salatrain_kernels on %s (%s, self-test passed)", what,
                    torch.cuda.get_device_name(q.device) if q.is_cuda else "CPU (Triton interpreter)", q.dtype)
    return True


def run_isolated(fn, *args, **kwargs):
    """Call ``fn`` in a fresh thread and return its result (re-raising its exception here).

    Autograd state is thread-local: grad mode, ``inference_mode`` and the saved-tensor hooks through which
    activation checkpointing counts what a forward saves. A self-test that runs its own backward inside the
    caller's forward would otherwise fail under ``no_grad``/``inference_mode`` (``generate``) and make a
    checkpointed layer's recomputation save a different number of tensors than its first forward. The thread
    starts with grad enabled, no inference mode and no hooks, on the caller's CUDA device."""
    device = kwargs.get("device")
    box: dict = {}

    def target():
        try:
            with contextlib.ExitStack() as stack:
                if isinstance(device, torch.device) and device.type == "cuda":
                    stack.enter_context(torch.cuda.device(device))
                stack.enter_context(torch.enable_grad())
                box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            box["error"] = e

    thread = threading.Thread(target=target, name="salatrain-kernel-self-test", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


# ----------------------------------------------------------------------------------------------------------------
# Mixers
# ----------------------------------------------------------------------------------------------------------------


class _Projections(nn.Module):
    """Q/K/V/O projections and optional per-head q/k norms, shared by every mixer type.

    Each mixer's ``attend(q, k, v, seq, ...)`` is its core attention over heads: q [B, T, h, D], k/v
    [B, Tk, hkv, D] for any h query heads sharing hkv K/V heads as the layer's GQA does, token layout ``seq``.
    It holds no parameters, so parallelism can wrap it from outside (``salatrain.train.sequence_parallel``)."""

    def __init__(self, config: SalaHybridConfig, layer_idx: int, num_kv_heads: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v


class _CachedKV(_Projections):
    """A softmax-type mixer (full or sparse attention): ``prepare`` → K/V into the cache → ``attend`` → ``finish``.
    GraphDecoder (decode_graphs.py, salatrain only) runs the three parts apart, so forward stays exactly this."""

    def forward(self, x, rope, seq: SeqInfo, cache: SalaHybridCache | None):
        q, k, v = self.prepare(x, rope, seq)
        if cache is not None:
            k, v = cache.append_kv(self.layer_idx, k, v)
        return self.finish(x, self.attend(q, k, v, seq))


class FullAttention(_CachedKV):
    """The base model's softmax attention: RoPE, GQA, optional sliding window and q/k norm (Qwen3)."""

    def __init__(self, config: SalaHybridConfig, layer_idx: int):
        super().__init__(config, layer_idx, config.num_key_value_heads)
        self.sliding_window = config.sliding_windows[layer_idx]
        if config.qk_norm:
            self.q_norm = SalaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = SalaRMSNorm(self.head_dim, config.rms_norm_eps)

    def prepare(self, x, rope, seq: SeqInfo):
        """q, k, v of the new tokens, ready for the cache and ``attend`` (forward = prepare, attend, finish)."""
        q, k, v = self.qkv(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def finish(self, x, o):
        """The layer's output from attend's o [B, T, H, D] (x: the layer's input)."""
        return self.o_proj(o.flatten(2))

    def attend(self, q, k, v, seq: SeqInfo) -> torch.Tensor:
        return softmax_attention(q, k, v, seq, self.sliding_window, scale=self.head_dim**-0.5)


class LightningAttention(_Projections):
    """Lightning (linear) attention: multi-head K/V (GQA expanded), q/k RMSNorm, RoPE, fixed per-head decay,
    output RMSNorm over all heads times a sigmoid gate σ(W_z x), then o_proj."""

    def __init__(self, config: SalaHybridConfig, layer_idx: int):
        super().__init__(config, layer_idx, config.num_attention_heads)
        lc = config.lightning_config
        eps = lc["norm_eps"] if lc["norm_eps"] is not None else config.rms_norm_eps
        self.use_rope = lc["use_rope"]
        self.chunk_size = lc["chunk_size"]
        self.q_norm = SalaRMSNorm(self.head_dim, eps)
        self.k_norm = SalaRMSNorm(self.head_dim, eps)
        self.o_norm = SalaRMSNorm(self.num_heads * self.head_dim, eps)
        self.z_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.register_buffer("decay", torch.tensor(config.lightning_decay, dtype=torch.float32), persistent=False)
        self.kernel_backend = "auto"

    def forward(self, x, rope, seq: SeqInfo, cache: SalaHybridCache | None):
        q, k, v = self.qkv(x)
        state = cache.states[self.layer_idx] if cache is not None else None
        decode = state is not None and q.shape[1] == 1
        # the fused norm/RoPE and norm/gate kernels also serve decoding: one launch each for ~24 and ~8 torch ops,
        # where a decoded token's time is the host's launches
        fused = _fused_ops() if _use_kernels(q, k, self.kernel_backend, "lightning_attn") else None
        if fused is not None and self.use_rope:
            q, k = fused.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, *rope, self.q_norm.variance_epsilon,
                                      backend="triton")
        else:
            q, k = self.q_norm(q), self.k_norm(k)
            if self.use_rope:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if seq.left_pad is not None:  # padding before the first real token leaves the state at zero
            pad = seq.positions < 0
            k, v = k.masked_fill(pad[..., None, None], 0.0), v.masked_fill(pad[..., None, None], 0.0)
        decay = self.decay.to(q.device)
        if decode:
            o, state = lightning_step(q, k, v, decay, state)
        else:
            o, state = self.attend(q, k, v, seq, decay, state, cache is not None)
        if cache is not None:
            cache.states[self.layer_idx] = state
        if fused is not None:
            o = fused.out_norm_gate(o.flatten(2), self.z_proj(x), self.o_norm.weight, self.o_norm.variance_epsilon,
                                    backend="triton")
        else:
            o = norm_sigmoid_gate(o.flatten(2), self.o_norm.weight, self.o_norm.variance_epsilon, self.z_proj(x))
        return self.o_proj(o)

    def attend(self, q, k, v, seq: SeqInfo, decay: torch.Tensor, initial_state: torch.Tensor | None = None,
               output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunked Lightning attention of heads whose decay rates are ``decay`` [h] (this layer's ``decay`` of
        those heads). Returns (o, final state or None)."""
        if _use_kernels(q, k, self.kernel_backend, "lightning_attn"):
            return _kernels.lightning_attn(
                q, k, v, decay, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=seq.cu_seqlens, backend="triton", chunk_size=self.chunk_size,
            )
        return lightning_attn_torch(
            q, k, v, decay, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=seq.cu_seqlens, chunk_size=self.chunk_size,
        )


class SparseAttention(_CachedKV):
    """InfLLM-V2 sparse attention (NoPE by default) with a sigmoid output gate σ(W_g x); no extra parameters
    for the block selection. Queries at document positions < dense_len attend densely (dense_len_mode
    "position"; under "sequence", every query of a document shorter than dense_len). The kernels and the
    reference take both forms of both selection rules."""

    def __init__(self, config: SalaHybridConfig, layer_idx: int):
        super().__init__(config, layer_idx, config.num_key_value_heads)
        sc = dict(config.sparse_config)
        self.use_rope = sc.pop("use_rope")
        self.nope_logit_scale = sc.pop("nope_logit_scale")
        self.nope_logit_scale_base = sc.pop("nope_logit_scale_base")
        self.share_tokens = sc.pop("share_tokens")  # a Triton launch setting: the same output
        self.sparse_params = sc
        geometry = (sc["block_size"], sc["kernel_size"], sc["kernel_stride"])
        self.triton_misfit = triton_geometry_problem(*geometry) if triton_geometry_problem else None
        if config.qk_norm:
            self.q_norm = SalaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = SalaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.g_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.kernel_backend = "auto"
        # decode one token with infllmv2_decode_torch even where the kernels run (prefill keeps them): it reads
        # nothing back from the device and launches fewer kernels than the Triton op (19-26% less time a token at
        # 8K-128K on an H200, docs/perf.md); False sends a decoding step to the op (bench/decode_gpu.py times both)
        self.decode_with_step = True

    def prepare(self, x, rope, seq: SeqInfo):
        """q, k, v of the new tokens, ready for the cache and ``attend`` (forward = prepare, attend, finish)."""
        q, k, v = self.qkv(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.nope_logit_scale:
            a = self.nope_logit_scale_base
            q = q * (torch.log(seq.positions.clamp(min=0).to(q.dtype) + a) / math.log(a))[..., None, None]
        return q, k, v

    def finish(self, x, o):
        """The layer's output from attend's o [B, T, H, D] (x: the layer's input): gate, then o_proj."""
        return self.o_proj(sigmoid_gate(o.flatten(2), self.g_proj(x)))

    def attend(self, q, k, v, seq: SeqInfo) -> torch.Tensor:
        if seq.left_pad is not None:  # each row's document starts after its padding; padded queries give 0
            o = q.new_zeros(q.shape)
            for b, pad in enumerate(seq.left_pad.tolist()):
                real = min(q.shape[1], k.shape[1] - pad)
                if real > 0:
                    sub = SeqInfo(seq.positions[b : b + 1, -real:])
                    o[b : b + 1, -real:] = self.attend(q[b : b + 1, -real:], k[b : b + 1, pad:], v[b : b + 1, pad:], sub)
            return o
        sp = self.sparse_params
        dense_upto = max(dense_prefix_len(sp["dense_len"], sp["dense_len_mode"]),
                         all_visible_len(sp["block_size"], sp["topk"], sp["window_size"]))
        if q.shape[1] == k.shape[1] and seq.past_len == 0 and q.shape[1] <= dense_upto:
            # every query attends densely (dense_len not reached, or every block visible): InfLLM-V2 is exactly
            # dense causal attention
            return softmax_attention(q, k, v, seq, None, scale=self.head_dim**-0.5)
        one_step = q.shape[1] == 1 and seq.cu_seqlens is None
        if one_step and self.decode_with_step:
            return infllmv2_decode_torch(q, k, v, **sp)
        rules = {name: sp[name] for name in ("dense_len_mode", "local_blocks")}
        if self._triton_fits(q) and _use_kernels(q, k, self.kernel_backend, "infllmv2_attn", **rules):
            return _kernels.infllmv2_attn(q, k, v, cu_seqlens=seq.cu_for_host, backend="triton",
                                          share_tokens=self.share_tokens, **sp)
        if one_step:
            # one decoding step without the kernels (CPU, backend 'torch', an export without salatrain): the
            # reference's output from a few torch ops, with no host synchronisation
            return infllmv2_decode_torch(q, k, v, **sp)
        return infllmv2_attn_torch(q, k, v, cu_seqlens=seq.cu_seqlens, **sp)

    def _triton_fits(self, q) -> bool:
        """Whether the Triton kernels take this layer's block geometry; if not, CUDA runs the PyTorch reference
        (with one warning) unless the backend was forced to 'triton'."""
        why = self.triton_misfit
        if not q.is_cuda or self.kernel_backend == "torch" or why is None:
            return True
        if self.kernel_backend == "triton":
            raise ValueError(why)
        if ("geometry", why) not in _checked:
            _checked[("geometry", why)] = True
            logger.warning("infllmv2_attn: %s; using the PyTorch reference (slow)", why)
        return False


MIXERS = {"full_attention": FullAttention, "linear_attention": LightningAttention, "sparse_attention": SparseAttention}


def softmax_attention(q, k, v, seq: SeqInfo, sliding_window: int | None, scale: float) -> torch.Tensor:
    """Causal GQA softmax attention of the T new queries over Tk keys; documents, padding, sliding window."""
    if seq.cu_seqlens is not None:
        o = _varlen_flash(q, k, v, seq, sliding_window, scale)
        if o is not None:
            return o
        bounds = seq.cu_for_host.tolist()
        outs = [
            _sdpa(q[:, s:e], k[:, s:e], v[:, s:e], None, sliding_window, scale) for s, e in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs, dim=1)
    return _sdpa(q, k, v, seq.left_pad, sliding_window, scale)


def _varlen_api():
    """torch's variable-length FlashAttention (torch.nn.attention.varlen) and its keyword arguments, or None.
    Its signature moved between torch releases (is_causal vs window_size, GQA), so it is read, not assumed."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


_VARLEN = _varlen_api()


def _varlen_flash(q, k, v, seq: SeqInfo, sliding_window: int | None, scale: float) -> torch.Tensor | None:
    """Packed documents [1, T, H, D] in one varlen FlashAttention call (CUDA, 16-bit, no cache), else None."""
    if (_VARLEN is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[1] != k.shape[1]
            or q.shape[-1] % 8 or q.shape[-1] > 256):
        return None
    fn, params = _VARLEN
    if sliding_window is not None and "window_size" not in params:
        return None
    q3, k3, v3 = q[0], k[0], v[0]
    kw = {}
    if q3.shape[1] != k3.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            group = q3.shape[1] // k3.shape[1]
            k3, v3 = k3.repeat_interleave(group, dim=1), v3.repeat_interleave(group, dim=1)
    if "scale" in params:
        kw["scale"] = scale
    elif abs(scale * q3.shape[-1] ** 0.5 - 1.0) > 1e-6:
        q3 = q3 * (scale * q3.shape[-1] ** 0.5)
    if "window_size" in params:
        kw["window_size"] = (sliding_window - 1 if sliding_window is not None else -1, 0)
    if "is_causal" in params:
        kw["is_causal"] = True
    cu, n = seq.cu_seqlens.to(torch.int32), seq.max_doc_len
    return fn(q3.contiguous(), k3.contiguous(), v3.contiguous(), cu, cu, n, n, **kw).unsqueeze(0)


# Mask entries ([query rows, keys]) of one masked SDPA call: a sliding window, left padding or queries behind a
# cache run in row chunks whose keys span [rows, rows + window - 1] (or [rows, Tk]), never [T, Tk].
SDPA_MASK_ENTRIES = 1 << 24


def _sdpa(q, k, v, left_pad, sliding_window, scale):
    """Causal softmax attention of the T queries (the last T of the Tk positions) over Tk keys, [B, T, H, D].

    The plain causal case (no window, no padding, T = Tk) is one SDPA call with ``is_causal`` and ``enable_gqa``.
    Otherwise query rows go in chunks (``_query_rows``); each chunk attends to the keys it can see (for a window
    of W, its last ``rows + W - 1``) under a [rows, keys] boolean mask, so memory is O(T·W) rather than O(T·Tk).
    Rows that see no key (padding) attend to every key of their chunk; their outputs are not used."""
    t, tk = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if left_pad is None and sliding_window is None and t == tk:
        gqa = {"enable_gqa": True} if kh.shape[1] != qh.shape[1] else {}
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, **gqa).transpose(1, 2)
    window = sliding_window if sliding_window is not None and sliding_window < tk else None
    group = qh.shape[1] // kh.shape[1]
    rows = _query_rows(t, tk, window, group)
    outs = []
    # a decoding step (one query) has a new key length every time: keep SDPA off cuDNN, which plans each new shape
    with decode_sdpa_backends(q.device) if t == 1 else contextlib.nullcontext():
        for s in range(0, t, rows):
            e = min(t, s + rows)
            first, last = tk - t + s, tk - t + e  # key positions of the chunk's first and one past its last query
            lo = max(0, first - window + 1) if window is not None else 0
            mask = _chunk_mask(first, last, lo, window, left_pad, q.device)
            outs.append(grouped_sdpa(qh[:, :, s:e], kh[:, :, lo:last], vh[:, :, lo:last], mask, scale))
    return torch.cat(outs, dim=2).transpose(1, 2)


def _query_rows(t: int, tk: int, window: int | None, group: int = 1) -> int:
    """Query rows per masked SDPA call, so that the mask's entries, group × rows × keys, stay within
    ``SDPA_MASK_ENTRIES``: keys = Tk without a window, at most rows + window − 1 with one."""
    budget = max(1, SDPA_MASK_ENTRIES // group)
    if window is None:
        return max(1, min(t, budget // tk))
    w = window - 1
    return max(1, min(t, int((math.sqrt(w * w + 4 * budget) - w) // 2)))


def _chunk_mask(first: int, last: int, lo: int, window: int | None, left_pad, device) -> torch.Tensor:
    """[1 or B, 1, last − first, last − lo] visibility of keys lo..last−1 from the queries at first..last−1."""
    qi = torch.arange(first, last, device=device).view(-1, 1)
    ki = torch.arange(lo, last, device=device).view(1, -1)
    mask = ki <= qi
    if window is not None:
        mask = mask & (ki > qi - window)
    mask = mask.view(1, 1, *mask.shape)
    if left_pad is not None:
        mask = mask & (ki.view(1, 1, 1, -1) >= left_pad.view(-1, 1, 1, 1))
        mask = mask | ~mask.any(-1, keepdim=True)  # rows of padding only: attend anywhere, output unused
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class SalaHybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: SalaHybridConfig, layer_idx: int):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.input_layernorm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MIXERS[self.mixer_type](config, layer_idx)
        self.post_attention_layernorm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SalaMLP(config)
        self.residual_scale = config.residual_scale

    def forward(self, hidden_states, rope, seq, cache=None):
        return self.add_mixer_and_mlp(hidden_states, self.self_attn(self.input_layernorm(hidden_states), rope, seq,
                                                                     cache))

    def add_mixer_and_mlp(self, h, a):
        """The layer's work after its mixer: the residual add of the mixer's output a, then the MLP block."""
        h = h + (a if self.residual_scale == 1.0 else self.residual_scale * a)
        m = self.mlp(self.post_attention_layernorm(h))
        return h + (m if self.residual_scale == 1.0 else self.residual_scale * m)


class SalaHybridPreTrainedModel(PreTrainedModel):
    config_class = SalaHybridConfig
    config: SalaHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SalaHybridDecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the hybrid keeps its own cache (Lightning states + K/V)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LightningAttention):
            init.copy_(module.decay, torch.tensor(self.config.lightning_decay, dtype=torch.float32))


class SalaHybridModel(SalaHybridPreTrainedModel):
    def __init__(self, config: SalaHybridConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(SalaHybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = SalaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SalaHybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: SalaHybridCache | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.scale_emb != 1.0:
            h = h * self.config.scale_emb
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = SalaHybridCache(self.config)
        if self.training:
            cache = None
        b, t = h.shape[:2]
        h, seq, rope_pos, unflatten = _sequence_layout(h, attention_mask, position_ids, cu_seqlens, cache, max_seqlen)
        rope = self.rotary_emb(h, rope_pos)
        hidden_states = [h] if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, rope, seq, cache)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.norm(h)
        if unflatten:
            h = h.view(b, t, -1)
        if cache is not None:
            cache.seen_tokens += t
        out = BaseModelOutputWithPast(last_hidden_state=h, hidden_states=tuple(hidden_states) if hidden_states else None)
        out[_CACHE_FIELD] = cache
        return out


def _sequence_layout(h, attention_mask, position_ids, cu_seqlens, cache, max_seqlen=None):
    """Work out documents, padding and positions. Rows with restarting position ids (packed documents) are
    flattened into one row with ``cu_seqlens``. Returns (h, seq, rope positions, whether h was flattened).

    ``cu_seqlens`` given: document boundaries over the B rows laid end to end (every row start is one), the rows
    are flattened; ``position_ids``, when given, are the positions within the documents. With ``max_seqlen``
    (the longest document) as well, nothing is read back from the device: the caller vouches for both, as a
    trainer that built them on the host from its batch does (:func:`packed_cu_seqlens`). Without it the
    boundaries are checked and the longest document measured, one host read each."""
    b, t = h.shape[:2]
    dev = h.device
    past = cache.seen_tokens if cache is not None else 0
    if cu_seqlens is not None:
        n = b * t
        if max_seqlen is None:
            if int(cu_seqlens[-1]) != n or int(cu_seqlens[0]) != 0:
                raise ValueError(f"cu_seqlens must run from 0 to the number of tokens {n}, got {cu_seqlens.tolist()}")
            if b > 1 and not bool(torch.isin(torch.arange(0, n, t, device=cu_seqlens.device), cu_seqlens).all()):
                raise ValueError("cu_seqlens over several rows must hold every row start as a boundary")
        cu, host = _doc_bounds(cu_seqlens, dev)
        if position_ids is not None:
            pos = position_ids.reshape(1, n).to(dev)
        else:
            pos = _positions_from_cu_seqlens(cu, n).view(1, n)
        seq = SeqInfo(pos, past, cu, _max_doc_len=int(max_seqlen) if max_seqlen is not None else None, cu_host=host)
        return h.reshape(1, n, -1), seq, pos, b > 1
    padded = attention_mask is not None and not bool(attention_mask.all())
    if position_ids is not None and past == 0 and t > 1 and not padded and bool((position_ids[:, 1:] == 0).any()):
        cu, host = _doc_bounds(packed_cu_seqlens(position_ids), dev)
        flat = position_ids.reshape(1, -1)
        return h.reshape(1, b * t, -1), SeqInfo(flat, 0, cu, cu_host=host), flat, b > 1
    left_pad = None
    if padded and attention_mask.dim() == 2:
        mask = attention_mask.bool()
        left_pad = (~mask).long().cumprod(-1).sum(-1)  # leading zeros per row
        idx = torch.arange(mask.shape[1], device=mask.device).view(1, -1)
        contiguous = (idx >= left_pad.view(-1, 1)) & (idx < (left_pad + mask.sum(-1)).view(-1, 1))
        if not bool((contiguous == mask).all()):
            raise ValueError("attention_mask may only pad on the left (generation) or on the right (training)")
        if not bool(left_pad.any()):
            left_pad = None
    idx = torch.arange(past, past + t, device=dev).view(1, t).expand(b, t)
    pos = idx - (left_pad.view(-1, 1).to(dev) if left_pad is not None else 0)
    rope_pos = position_ids if position_ids is not None else pos.clamp(min=0)
    return h, SeqInfo(pos, past, None, left_pad.to(dev) if left_pad is not None else None), rope_pos, False


def packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries (int32 [N+1]) of rows [B, T] whose ``position_ids`` restart at 0 where a document
    starts, over the rows laid end to end: every restart and every row start."""
    b, t = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    starts = torch.unique(torch.cat([starts, torch.arange(0, b * t, t, device=starts.device)]))
    return torch.cat([starts, torch.tensor([b * t], device=starts.device)]).to(torch.int32)


def _doc_bounds(cu_seqlens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Document bounds as int32 on ``device``, and on the host when they came from there (None otherwise). A host
    tensor goes to a GPU through pinned memory: a copy from pageable memory waits for the stream's queued work."""
    if cu_seqlens.device.type != "cpu":
        return cu_seqlens.to(device=device, dtype=torch.int32), None
    host = cu_seqlens.to(torch.int32)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True), host
    return host.to(device), host


def _positions_from_cu_seqlens(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    idx = torch.arange(t, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(torch.int64), idx, right=True)
    return idx - cu_seqlens.to(torch.int64)[doc]


class SalaHybridForCausalLM(SalaHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SalaHybridConfig):
        super().__init__(config)
        self.model = SalaHybridModel(config)
        self.vocab_size = config.vocab_size
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

    def set_kernel_backend(self, backend: str) -> None:
        """'auto' (Triton on CUDA when available), 'triton' (required) or 'torch' (reference mixers)."""
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel backend must be auto, triton or torch, got {backend!r}")
        for module in self.modules():
            if hasattr(module, "kernel_backend"):
                module.kernel_backend = backend

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SalaHybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seqlens: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: SalaHybridCache | None = None,
        return_dict: bool | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            cu_seqlens=cu_seqlens, output_hidden_states=output_hidden_states, max_seqlen=max_seqlen,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        if self.config.logit_scale != 1.0:
            h = h * self.config.logit_scale
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states)
        result[_CACHE_FIELD] = out[_CACHE_FIELD]
        return result

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, cache=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = SalaHybridCache(self.config)
        seen = cache.seen_tokens if cache is not None else 0
        inputs = {"use_cache": use_cache, "attention_mask": attention_mask, "cache": cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if attention_mask is not None:
            pos = attention_mask.long().cumsum(-1) - 1
            pos = pos.masked_fill(attention_mask == 0, 1)
            new = inputs["input_ids"].shape[1] if "input_ids" in inputs else inputs_embeds.shape[1]
            inputs["position_ids"] = pos[:, -new:]
        return inputs

    def generate(self, *args, cuda_graphs: bool | None = None, **kwargs):
        """transformers' ``generate``. On CUDA, greedy and sampled decoding with one beam and no assistant runs its
        steps through ``decode_graphs.sample``: the same loop and tokens, with the work between the attention
        calls replayed as CUDA graphs (a 1B hybrid decodes ~5x faster a token on an H200; docs/perf.md). Calls it
        does not cover (padded rows, ``return_dict_in_generate``, ...) keep transformers' loop.
        ``cuda_graphs=False`` always keeps it; ``cuda_graphs=True`` takes that path off CUDA too (eagerly)."""
        config = kwargs.get("generation_config") or self.generation_config
        one_beam = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1) == 1
        plain = (len(args) <= 1 and kwargs.get("custom_generate") is None and kwargs.get("assistant_model") is None
                 and one_beam)
        if plain and (cuda_graphs or (cuda_graphs is None and self.device.type == "cuda")):
            from .decode_graphs import sample

            kwargs["custom_generate"] = sample
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HF save, plus the modeling files and ``auto_map`` so ``trust_remote_code=True`` loads it anywhere."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_model_code(save_directory)

    def _reorder_cache(self, cache, beam_idx):
        if cache is not None:  # (beam search without a cache passes None)
            cache.reorder_cache(beam_idx)
        return cache


__all__ = ["SalaHybridModel", "SalaHybridForCausalLM", "SalaHybridPreTrainedModel", "SalaHybridCache", "SeqInfo"]
