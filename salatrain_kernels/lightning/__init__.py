"""Lightning attention: linear attention with a fixed per-head decay, forward and backward.

Per head h with lam_h = exp(-s_h) and state S [D_k, D_v] (fp32):

    S_t = lam_h S_{t-1} + k_t v_t^T,      o_t = S_t^T (scale * q_t)
    i.e. o_t = scale * sum_{s<=t} lam_h^(t-s) (q_t . k_s) v_s  +  scale * lam_h^(t+1) S_{-1}^T q_t

No feature map. The state resets at document boundaries.

    lightning_attn(q, k, v, decay, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, chunk_size=64, backend="auto") -> (o, final_state)

    q, k, v        [B, T, H, D], one of bf16 / fp16 / fp32 (all the same), any D from 1 to 256 (the Triton
                   kernel pads D to a power of two >= 16 internally; powers of two waste nothing)
    decay          [H] positive log-decays s_h (fp32). It gets NO gradient: it is a fixed hyperparameter.
    scale          multiplies q.k; None means D**-0.5 (pass unscaled q)
    initial_state  [N, H, D, D] fp32 or None, state[n, h] = S with shape [D_k, D_v]; differentiable
    cu_seqlens     int32/int64 [N+1] document offsets (FlashAttention convention); requires B = 1.
                   Without it N = B.
    chunk_size     tokens per chunk of the chunked form (the result does not depend on it); the Triton
                   kernel takes a power of two from 16 to 128 (TRITON_CHUNK_SIZES), fla only 64
    backend        "auto": Triton for CUDA tensors, the PyTorch reference otherwise
                   "triton": the Triton kernel (on CPU only under TRITON_INTERPRET=1, set before import)
                   "torch": the PyTorch reference, naive.lightning_attn_torch (chunked, fp32 inside, autograd)
                   "fla": flash-linear-attention's chunk_simple_gla with g_gamma = -decay (if installed)
    returns        o like q; final_state [N, H, D, D] fp32, or None unless output_final_state.

Cost of the Triton path (chunk.py): forward one scan pass, backward three passes in one launch; each pass
is ~4*T*H*D*(C + D) FLOPs (C = chunk_size) on tensor cores and reads q/k/v-sized inputs once. No
[T/C, H, D, D] intermediate states are stored: the state lives in registers, so memory is O(B*T*H*D).
"""
from __future__ import annotations

import torch

from ..utils import resolve_backend
from .naive import lightning_attn_torch, lightning_step

__all__ = ["lightning_attn", "lightning_attn_torch", "lightning_step", "TRITON_CHUNK_SIZES"]

TRITON_CHUNK_SIZES = (16, 32, 64, 128)  # the scan kernel's token tile (tl.dot needs >= 16; 128 already spills)
FLA_CHUNK_SIZE = 64

MAX_HEAD_DIM = 256


def _validate(q, k, v, decay, initial_state, cu_seqlens):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} > {MAX_HEAD_DIM} is not supported")
    if decay.shape != (H,):
        raise ValueError(f"decay must be [H]={H}, got {tuple(decay.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor [N+1]")
    num_seqs = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (num_seqs, H, D, D):
        raise ValueError(f"initial_state must be [{num_seqs}, {H}, {D}, {D}], got {tuple(initial_state.shape)}")
    return num_seqs


def _fla(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        raise ImportError("backend='fla' needs flash-linear-attention (pip install flash-linear-attention)") from e
    g_gamma = -decay.detach().float()
    return chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state,
                            cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())


def lightning_attn(q, k, v, decay, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, chunk_size=64, backend="auto"):
    """Lightning attention (see the module docstring). Returns (o, final_state or None)."""
    num_seqs = _validate(q, k, v, decay, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend(backend, q, extra=("fla",))
    if backend == "torch":
        return lightning_attn_torch(q, k, v, decay, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                    chunk_size=chunk_size)
    if backend == "fla":
        if chunk_size != FLA_CHUNK_SIZE:
            raise ValueError(f"chunk_size={chunk_size}: backend='fla' uses fla's chunks of {FLA_CHUNK_SIZE}")
        return _fla(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)
    if chunk_size not in TRITON_CHUNK_SIZES:
        raise ValueError(f"chunk_size={chunk_size}: the Triton Lightning kernel takes one of {TRITON_CHUNK_SIZES} "
                         "(use backend='torch' for others)")
    from .chunk import LightningAttnFunction

    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device).contiguous()
    return LightningAttnFunction.apply(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens,
                                       num_seqs, chunk_size)
