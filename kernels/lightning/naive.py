"""Pure-PyTorch Lightning attention: the quadratic reference and a chunked form for the "torch" backend.

Both have the signature of ``lightning_attn`` (minus ``backend``) and get their gradients from autograd.

    lightning_attn_naive   o = scale * ((Q K^T) * lam^(t-s) * [s<=t]) V + scale * lam^(t+1) Q S0, per document.
                           O(T^2) time and memory per head; computes in fp32 (fp64 for fp64 inputs), or in
                           ``compute_dtype`` to measure what plain PyTorch loses in low precision.
    lightning_attn_chunk_torch
                           chunks of 64: intra-chunk masked attention + inter-chunk Q S, with the states of all
                           chunks from one decay-weighted sum over chunk contributions. O(T*64 + (T/64)^2)
                           per head, fp32; memory [T/64, H, D, D] fp32 (268 MB at T=8K, H=32, D=128).
"""
from __future__ import annotations

import torch

CHUNK = 64


def _docs(x, cu_seqlens):
    """Split [B, T, ...] into per-document [T_n, ...] views (B docs, or the cu_seqlens docs of batch 0)."""
    if cu_seqlens is None:
        return [x[b] for b in range(x.shape[0])]
    bounds = cu_seqlens.tolist()
    return [x[0, bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def _join(outs, like, cu_seqlens):
    if cu_seqlens is None:
        return torch.stack(outs, 0)
    return torch.cat(outs, 0).unsqueeze(0)


def _naive_doc(q, k, v, s, scale, h0):
    """One document. q, k, v [T, H, D]; s [H]; h0 [H, D, D] or None -> (o [T, H, D], final [H, D, D])."""
    T = q.shape[0]
    t = torch.arange(T, device=q.device)
    dist = (t[:, None] - t[None, :]).to(s.dtype)
    mask = torch.exp(-s[:, None, None] * dist.clamp(min=0)) * (dist >= 0)
    scores = torch.einsum("thd,shd->hts", q, k) * mask.to(q.dtype)
    o = torch.einsum("hts,shd->thd", scores, v)
    tail = torch.exp(-s[None, :] * (T - 1 - t[:, None]).to(s.dtype)).to(q.dtype)  # [T, H]
    final = torch.einsum("thk,thv->hkv", k * tail[..., None], v)
    if h0 is not None:
        head = torch.exp(-s[None, :] * (t[:, None] + 1).to(s.dtype)).to(q.dtype)
        o = o + torch.einsum("thk,hkv->thv", q * head[..., None], h0)
        final = final + torch.exp(-s * T).to(q.dtype)[:, None, None] * h0
    return o * scale, final


def _check_and_prepare(q, k, v, decay, scale, initial_state, cu_seqlens):
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got {q.shape[0]}")
    return q.shape[-1] ** -0.5 if scale is None else scale


def lightning_attn_naive(q, k, v, decay, *, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, compute_dtype=None):
    """Quadratic reference. q, k, v [B, T, H, D]; decay [H] (s_h, lam_h = exp(-s_h));
    initial_state [N, H, D, D] fp32 or None. Returns (o like q, final_state [N, H, D, D] fp32 or None)."""
    scale = _check_and_prepare(q, k, v, decay, scale, initial_state, cu_seqlens)
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = decay.detach().to(torch.float64 if compute_dtype == torch.float64 else torch.float32)
    outs, finals = [], []
    docs = zip(_docs(q, cu_seqlens), _docs(k, cu_seqlens), _docs(v, cu_seqlens))
    for n, (qn, kn, vn) in enumerate(docs):
        h0 = None if initial_state is None else initial_state[n].to(compute_dtype)
        o, final = _naive_doc(qn.to(compute_dtype), kn.to(compute_dtype), vn.to(compute_dtype), s, scale, h0)
        outs.append(o.to(q.dtype))
        finals.append(final.float() if compute_dtype != torch.float64 else final)
    o = _join(outs, q, cu_seqlens)
    return o, (torch.stack(finals, 0) if output_final_state else None)


def _chunk_doc(q, k, v, s, scale, h0, chunk=CHUNK):
    """One document in chunked form, fp32. q, k, v [T, H, D] -> (o [T, H, D], final [H, D, D])."""
    T, H, D = q.shape
    nc = -(-T // chunk)
    pad = nc * chunk - T
    qc, kc, vc = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(nc, chunk, H, D) for x in (q, k, v))
    i = torch.arange(chunk, device=q.device, dtype=s.dtype)
    dist = i[:, None] - i[None, :]
    mask = torch.exp(-s[:, None, None] * dist.clamp(min=0)) * (dist >= 0)  # [H, C, C]
    scores = torch.einsum("nihd,njhd->nhij", qc, kc) * mask
    o = torch.einsum("nhij,njhd->nihd", scores, vc)
    # per-chunk contributions to the state at the chunk's last row, then states entering each chunk
    k_tail = kc * torch.exp(-s[None, :] * (chunk - 1 - i)[:, None])[None, :, :, None]  # [nc, C, H, D]
    contrib = torch.einsum("njhk,njhv->nhkv", k_tail, vc)
    c = torch.arange(nc, device=q.device, dtype=s.dtype)
    gap = c[:, None] - 1 - c[None, :]  # chunk n receives chunk m < n decayed by lam^(C*(n-1-m))
    weight = torch.exp(-s[:, None, None] * chunk * gap.clamp(min=0)) * (gap >= 0)  # [H, nc, nc]
    states = torch.einsum("hnm,mhkv->nhkv", weight, contrib)
    if h0 is not None:
        states = states + torch.exp(-s[None, :] * chunk * c[:, None])[..., None, None] * h0
    q_head = qc * torch.exp(-s[None, :] * (i + 1)[:, None])[None, :, :, None]
    o = o + torch.einsum("nihk,nhkv->nihv", q_head, states)
    o = o.reshape(nc * chunk, H, D)[:T] * scale
    t = torch.arange(T, device=q.device, dtype=s.dtype)
    tail = torch.exp(-s[None, :] * (T - 1 - t)[:, None])
    final = torch.einsum("thk,thv->hkv", k * tail[..., None], v)
    if h0 is not None:
        final = final + torch.exp(-s * T)[:, None, None] * h0
    return o, final


def lightning_attn_chunk_torch(q, k, v, decay, *, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
    """Chunked PyTorch form (fp32 inside), same signature and results as ``lightning_attn_naive``."""
    scale = _check_and_prepare(q, k, v, decay, scale, initial_state, cu_seqlens)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = decay.detach().to(cdt)
    outs, finals = [], []
    docs = zip(_docs(q, cu_seqlens), _docs(k, cu_seqlens), _docs(v, cu_seqlens))
    for n, (qn, kn, vn) in enumerate(docs):
        h0 = None if initial_state is None else initial_state[n].to(cdt)
        o, final = _chunk_doc(qn.to(cdt), kn.to(cdt), vn.to(cdt), s, scale, h0)
        outs.append(o.to(q.dtype))
        finals.append(final if cdt == torch.float64 else final.float())
    o = _join(outs, q, cu_seqlens)
    return o, (torch.stack(finals, 0) if output_final_state else None)
