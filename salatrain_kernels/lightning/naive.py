"""Lightning attention (fixed-decay linear attention) in pure PyTorch: the one reference of the op, in chunked
form and as a recurrent step. Imports torch only.

Where it is used: backend="torch" of salatrain_kernels.lightning (``lightning_attn_torch`` has the signature
of ``lightning_attn``), the kernels' self-test, and the model's Lightning mixer when the kernels do not run
(and for decoding, ``lightning_step``). It lives in salatrain_kernels because the kernels may not import
application code while the model may import the kernels; ``save_pretrained`` copies this file next to the
weights as ``lightning_attention.py`` (``copy_model_code`` in modeling_sala_hybrid.py), which is where an
exported checkpoint imports it from, so the export still needs only torch and transformers. Keep it free of
imports other than torch and the standard library.

Legend: B batch, T tokens, H heads, D head dim, C chunk length, N chunks (or documents).
Per head h with λ_h = exp(-s_h):   S_t = λ_h S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t)
The state S is [D_k, D_v] and kept in fp32 (fp64 for fp64 inputs). The decay gets no gradient. Memory is
O(T) per head: chunk by chunk, with the state carried across chunks.
"""

from __future__ import annotations

import torch


def lightning_attn_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked Lightning attention. q, k, v [B, T, H, D]; decay [H] (s_h > 0); state fp32 [N, H, D, D].

    With ``cu_seqlens`` ([N+1], B must be 1) every document starts from its own initial state (zeros if none)
    and nothing crosses a boundary. Returns (o [B, T, H, D] in q's dtype, final_state or None).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        o, state = _chunked(q, k, v, decay, scale, initial_state, chunk_size)
        return o, (state if output_final_state else None)
    if q.shape[0] != 1:
        raise ValueError("cu_seqlens requires batch size 1 (packed documents)")
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = None if initial_state is None else initial_state[n : n + 1]
        o, s = _chunked(q[:, start:end], k[:, start:end], v[:, start:end], decay, scale, init, chunk_size)
        outs.append(o)
        states.append(s)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(states, dim=0) if output_final_state else None)


def _chunked(q, k, v, decay, scale, initial_state, chunk_size):
    """One sequence per batch row. Returns (o, final_state)."""
    b, t, h, d = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    state = (
        torch.zeros(b, h, d, dv, dtype=work, device=q.device)
        if initial_state is None
        else initial_state.to(work).clone()
    )
    if t == 0:
        return q.new_zeros(b, 0, h, dv), state.float()
    c = chunk_size
    n = (t + c - 1) // c
    pad = n * c - t
    # [B, H, N, C, D]
    qc, kc, vc = (
        torch.nn.functional.pad(x.to(work), (0, 0, 0, 0, 0, pad)).view(b, n, c, h, -1).permute(0, 3, 1, 2, 4)
        for x in (q, k, v)
    )
    qc = qc * scale
    s = decay.detach().to(device=q.device, dtype=work).view(1, h, 1, 1)
    idx = torch.arange(c, device=q.device, dtype=work)
    diff = idx.view(-1, 1) - idx.view(1, -1)
    # intra-chunk mask λ^(i-j) for j <= i
    mask = torch.exp(-s.unsqueeze(-1) * diff.clamp(min=0)) * (diff >= 0)  # [1, H, 1, C, C]
    attn = torch.einsum("bhncd,bhnsd->bhncs", qc, kc) * mask
    o = torch.einsum("bhncs,bhnsd->bhncd", attn, vc)
    # inter-chunk: o_i += λ^(i+1) q_i S_prev; chunk state contribution Σ_j λ^(L-1-j) k_j v_jᵀ
    q_decay = torch.exp(-s.view(1, h, 1) * (idx + 1).view(1, 1, -1))  # [1, H, C]
    lens = [c] * (n - 1) + [c - pad]
    o_inter = []
    for i in range(n):
        length = lens[i]
        o_inter.append(torch.einsum("bhcd,bhde->bhce", qc[:, :, i] * q_decay.unsqueeze(-1), state))
        k_decay = torch.exp(-s.view(1, h, 1) * (length - 1 - idx[:length]).view(1, 1, -1))  # [1, H, L]
        contrib = torch.einsum("bhcd,bhce->bhde", kc[:, :, i, :length] * k_decay.unsqueeze(-1), vc[:, :, i, :length])
        state = torch.exp(-s * length) * state + contrib
    o = o + torch.stack(o_inter, dim=2)
    o = o.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :t]
    return o.to(dtype), state.float() if work != torch.float64 else state


def lightning_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, state: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form, one token at a time: q, k, v [B, T, H, D], state fp32 [B, H, D, D] → (o, new state).

    O(1) memory per token; used for decoding (T = 1) and as an independent check of the chunked form.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = torch.exp(-decay.detach().to(device=q.device, dtype=work)).view(1, -1, 1, 1)
    state = state.to(work)
    if q.shape[1] == 1:  # a decoding step: the same recurrence in four ops (each one a kernel launch on a GPU)
        state = torch.addcmul(lam * state, k[:, 0, :, :, None].to(work), v[:, 0, :, None, :].to(work))
        o = torch.matmul((q[:, 0].to(work) * scale).unsqueeze(-2), state).transpose(1, 2).to(q.dtype)
        return o, (state if work == torch.float64 else state.float())
    outs = []
    for i in range(q.shape[1]):
        state = lam * state + torch.einsum("bhd,bhe->bhde", k[:, i].to(work), v[:, i].to(work))
        outs.append(torch.einsum("bhde,bhd->bhe", state, q[:, i].to(work) * scale))
    o = torch.stack(outs, dim=1).to(q.dtype)
    return o, (state if work == torch.float64 else state.float())
