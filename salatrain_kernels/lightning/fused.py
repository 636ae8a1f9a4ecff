"""Fused pieces of the Lightning mixer around the core, each a Triton kernel with autograd beside a
PyTorch reference of the same signature (``*_torch``).

    qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps) -> (q_out, k_out)
        q [B, T, Hq, D], k [B, T, Hk, D] (same dtype, D even); weights [D] shared by heads;
        cos, sin [B, T, D] or [1, T, D] as HF's rotary embedding returns them.
        Per head: HF Qwen3RMSNorm over D,  y = weight * (x_fp32 * rsqrt(mean(x^2) + eps)).to(dtype),
        then RoPE in HF's rotate_half convention,  out = y * cos + rotate_half(y) * sin.
    out_norm_gate(o, z, weight, eps) -> y
        o, z [B, T, N] (N = H*D); weight [N]. y = RMSNorm(o) * sigmoid(z), the norm as above.
    rms_norm(x, weight, eps) -> y
        the norm alone over the last dim, forward only (inference; the model's decoder norms when decoding).

Numerics: the kernels compute in fp32 and round to the input dtype at the same points as the HF modules
do when the weights share the input dtype, so outputs match HF bit for bit up to the order of the mean's
summation. Outputs have the input dtype. Gradients flow to q, k, o, z and the weights (fp32 accumulation,
returned in the weights' dtype); cos and sin get none. Backward recomputes the norm from the inputs, so
only the inputs are saved.

Cost: one read of each input and one write of each output (memory-bound), against ~8-12 elementwise
passes over fp32 copies for the PyTorch composition. Weight gradients are reduced per program into
[programs, D] fp32 partials and summed by torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import device_guard, next_pow2, resolve_backend
from .chunk import new_buffer

# Programs per launch: forwards take one row each; backwards loop over a few rows to bound the weight-gradient
# partials ([programs, D] for q/k, [programs, H*D] for the output norm).
MAX_PROGRAMS_FWD = 1 << 20
MAX_PROGRAMS_QK_BWD = 1 << 14
MAX_PROGRAMS_OUT_BWD = 1 << 12


def rms_norm_hf(x, weight, eps):
    """HF Qwen3RMSNorm / LlamaRMSNorm over the last dim."""
    x32 = x.float()
    var = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(var + eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def qk_norm_rope_torch(q, k, q_weight, k_weight, cos, sin, eps):
    """Reference: HF RMSNorm per head, then HF apply_rotary_pos_emb on [B, T, H, D] tensors."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    qn, kn = rms_norm_hf(q, q_weight, eps), rms_norm_hf(k, k_weight, eps)
    q_out = qn * cos + rotate_half(qn) * sin
    k_out = kn * cos + rotate_half(kn) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def out_norm_gate_torch(o, z, weight, eps):
    """Reference: HF RMSNorm over the last dim times sigmoid(z)."""
    return (rms_norm_hf(o, weight, eps) * torch.sigmoid(z)).to(o.dtype)


def _programs(rows, max_programs):
    """(number of programs, rows per program)."""
    if rows == 0:
        return 1, 0
    per_prog = triton.cdiv(rows, max(1, min(rows, max_programs)))
    return triton.cdiv(rows, per_prog), per_prog


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """Round an fp32 value to the storage dtype and back (where PyTorch would round)."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _norm_rope_fwd_tile(x, out, w, cos_v, sin_v, tok, n_tok, eps,
                        NH: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    o_h = tl.arange(0, BH)
    o_d = tl.arange(0, BD)
    perm = (o_d + D // 2) % D
    sign = tl.where(o_d < D // 2, -1.0, 1.0)
    d_lim = D * (tok < n_tok).to(tl.int32)  # 0 past the last token
    mask = (o_h[:, None] < NH) & (o_d[None, :] < d_lim)
    base = tok.to(tl.int64) * NH * D + o_h[:, None] * D
    DT = out.dtype.element_ty
    xv = tl.load(x + base + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(x + base + perm[None, :], mask=mask, other=0.0).to(tl.float32)
    wv = tl.load(w + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    wr = tl.load(w + perm, mask=o_d < D, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, axis=1) / D + eps)
    y = _rnd(wv[None, :] * _rnd(xv * r[:, None], DT), DT)
    yr = _rnd(wr[None, :] * _rnd(xr * r[:, None], DT), DT)
    res = _rnd(y * cos_v[None, :], DT) + _rnd(sign[None, :] * yr * sin_v[None, :], DT)
    tl.store(out + base + o_d[None, :], res.to(DT), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(q, k, qo, ko, qw, kw, cos, sin, n_tok, T, cos_bstride, eps, TOK_PER_PROG,
                             HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                             BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    o_d = tl.arange(0, BD)
    for i in range(0, TOK_PER_PROG):
        tok = pid * TOK_PER_PROG + i
        c_off = (tok // T).to(tl.int64) * cos_bstride + (tok % T).to(tl.int64) * D
        m_cs = o_d < D * (tok < n_tok).to(tl.int32)
        cos_v = tl.load(cos + c_off + o_d, mask=m_cs, other=0.0).to(tl.float32)
        sin_v = tl.load(sin + c_off + o_d, mask=m_cs, other=0.0).to(tl.float32)
        _norm_rope_fwd_tile(q, qo, qw, cos_v, sin_v, tok, n_tok, eps, HQ, D, BHQ, BD)
        _norm_rope_fwd_tile(k, ko, kw, cos_v, sin_v, tok, n_tok, eps, HK, D, BHK, BD)


@triton.jit
def _norm_rope_bwd_tile(x, dout, dx, w, cos, sin, c_off, tok, n_tok, eps,
                        NH: tl.constexpr, D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """dx for one token's heads; returns this token's [BD] contribution to the weight gradient."""
    o_h = tl.arange(0, BH)
    o_d = tl.arange(0, BD)
    m_d = o_d < D * (tok < n_tok).to(tl.int32)
    perm = (o_d + D // 2) % D
    # d/dy of (y*cos + rotate_half(y)*sin) applied to g: g*cos + [g2*sin2, -g1*sin1]
    sign_b = tl.where(o_d < D // 2, 1.0, -1.0)
    mask = (o_h[:, None] < NH) & m_d[None, :]
    base = tok.to(tl.int64) * NH * D + o_h[:, None] * D
    DT = dx.dtype.element_ty
    cos_v = tl.load(cos + c_off + o_d, mask=m_d, other=0.0).to(tl.float32)
    sin_r = tl.load(sin + c_off + perm, mask=m_d, other=0.0).to(tl.float32)
    g = tl.load(dout + base + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    gr = tl.load(dout + base + perm[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = g * cos_v[None, :] + sign_b[None, :] * gr * sin_r[None, :]
    xv = tl.load(x + base + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    wv = tl.load(w + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xv * xv, axis=1) / D + eps)
    n = xv * r[:, None]
    dn = dy * wv[None, :]
    res = r[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
    tl.store(dx + base + o_d[None, :], res.to(DT), mask=mask)
    return tl.sum(dy * _rnd(n, DT), axis=0)


@triton.jit
def _qk_norm_rope_bwd_kernel(q, k, dqo, dko, dq, dk, qw, kw, dqw_part, dkw_part, cos, sin,
                             n_tok, T, cos_bstride, eps, TOK_PER_PROG,
                             HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                             BHQ: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    o_d = tl.arange(0, BD)
    acc_q = tl.zeros([BD], dtype=tl.float32)
    acc_k = tl.zeros([BD], dtype=tl.float32)
    for i in range(0, TOK_PER_PROG):
        tok = pid * TOK_PER_PROG + i
        c_off = (tok // T).to(tl.int64) * cos_bstride + (tok % T).to(tl.int64) * D
        acc_q += _norm_rope_bwd_tile(q, dqo, dq, qw, cos, sin, c_off, tok, n_tok, eps, HQ, D, BHQ, BD)
        acc_k += _norm_rope_bwd_tile(k, dko, dk, kw, cos, sin, c_off, tok, n_tok, eps, HK, D, BHK, BD)
    tl.store(dqw_part + pid * D + o_d, acc_q, mask=o_d < D)
    tl.store(dkw_part + pid * D + o_d, acc_k, mask=o_d < D)


def _rope_tables(cos, sin, B, T, D):
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"cos/sin must be [B or 1, T, D] = [{B}, {T}, {D}], got {tuple(cos.shape)}")
    return cos.contiguous(), sin.contiguous(), (0 if cos.shape[0] == 1 else T * D)


class QKNormRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, eps):
        B, T, HQ, D = q.shape
        HK = k.shape[2]
        q, k = q.contiguous(), k.contiguous()
        cos, sin, cos_bstride = _rope_tables(cos, sin, B, T, D)
        qo, ko = new_buffer(q), new_buffer(k)
        num_prog, per_prog = _programs(B * T, MAX_PROGRAMS_FWD)
        with device_guard(q):
            _qk_norm_rope_fwd_kernel[(num_prog,)](
                q=q, k=k, qo=qo, ko=ko, qw=q_weight, kw=k_weight, cos=cos, sin=sin, n_tok=B * T, T=T,
                cos_bstride=cos_bstride, eps=eps, TOK_PER_PROG=per_prog,
                HQ=HQ, HK=HK, D=D, BHQ=next_pow2(HQ), BHK=next_pow2(HK),
                BD=next_pow2(D),
                num_warps=_row_warps(next_pow2(max(HQ, HK)) * next_pow2(D)))
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
        ctx.eps, ctx.cos_bstride = eps, cos_bstride
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
        B, T, HQ, D = q.shape
        HK = k.shape[2]
        dqo = torch.zeros_like(q) if dqo is None else dqo.contiguous()
        dko = torch.zeros_like(k) if dko is None else dko.contiguous()
        dq, dk = new_buffer(q), new_buffer(k)
        num_prog, per_prog = _programs(B * T, MAX_PROGRAMS_QK_BWD)
        dqw = new_buffer(q, (num_prog, D), torch.float32)
        dkw = new_buffer(q, (num_prog, D), torch.float32)
        with device_guard(q):
            _qk_norm_rope_bwd_kernel[(num_prog,)](
                q=q, k=k, dqo=dqo, dko=dko, dq=dq, dk=dk, qw=q_weight, kw=k_weight, dqw_part=dqw, dkw_part=dkw,
                cos=cos, sin=sin, n_tok=B * T, T=T, cos_bstride=ctx.cos_bstride, eps=ctx.eps, TOK_PER_PROG=per_prog,
                HQ=HQ, HK=HK, D=D, BHQ=next_pow2(HQ), BHK=next_pow2(HK),
                BD=next_pow2(D),
                num_warps=_row_warps(next_pow2(max(HQ, HK)) * next_pow2(D)))
        return (dq, dk, dqw.sum(0).to(q_weight.dtype), dkw.sum(0).to(k_weight.dtype), None, None, None)


@triton.jit
def _gate_row(o, z, row, n_rows, o_n, N: tl.constexpr):
    """Row `row` of o and z (fp32, masked past n_rows): the mask, the row's offset, o and z."""
    mask = o_n < N * (row < n_rows).to(tl.int32)
    base = row.to(tl.int64) * N
    xv = tl.load(o + base + o_n, mask=mask, other=0.0).to(tl.float32)
    zv = tl.load(z + base + o_n, mask=mask, other=0.0).to(tl.float32)
    return mask, base, xv, zv


@triton.jit
def _out_norm_gate_fwd_kernel(o, z, w, y, n_rows, eps, ROWS_PER_PROG, N: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    o_n = tl.arange(0, BN)
    DT = y.dtype.element_ty
    wv = tl.load(w + o_n, mask=o_n < N, other=0.0).to(tl.float32)
    for i in range(0, ROWS_PER_PROG):
        mask, base, xv, zv = _gate_row(o, z, pid * ROWS_PER_PROG + i, n_rows, o_n, N)
        r = tl.rsqrt(tl.sum(xv * xv, axis=0) / N + eps)
        yn = _rnd(wv * _rnd(xv * r, DT), DT)
        gate = _rnd(tl.sigmoid(zv), DT)
        tl.store(y + base + o_n, (yn * gate).to(DT), mask=mask)


@triton.jit
def _out_norm_gate_bwd_kernel(o, z, w, dy, do, dz, dw_part, n_rows, eps, ROWS_PER_PROG,
                              N: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    o_n = tl.arange(0, BN)
    DT = do.dtype.element_ty
    wv = tl.load(w + o_n, mask=o_n < N, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BN], dtype=tl.float32)
    for i in range(0, ROWS_PER_PROG):
        mask, base, xv, zv = _gate_row(o, z, pid * ROWS_PER_PROG + i, n_rows, o_n, N)
        g = tl.load(dy + base + o_n, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(xv * xv, axis=0) / N + eps)
        n = xv * r
        n_lp = _rnd(n, DT)
        yn = _rnd(wv * n_lp, DT)
        sg = tl.sigmoid(zv)
        tl.store(dz + base + o_n, (g * yn * sg * (1.0 - sg)).to(DT), mask=mask)
        d_yn = g * _rnd(sg, DT)
        acc_w += d_yn * n_lp
        dn = d_yn * wv
        res = r * (dn - n * (tl.sum(dn * n, axis=0) / N))
        tl.store(do + base + o_n, res.to(DT), mask=mask)
    tl.store(dw_part + pid * N + o_n, acc_w, mask=o_n < N)


@triton.jit
def _rms_norm_fwd_kernel(x, w, y, n_rows, eps, ROWS_PER_PROG, N: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    o_n = tl.arange(0, BN)
    DT = y.dtype.element_ty
    wv = tl.load(w + o_n, mask=o_n < N, other=0.0).to(tl.float32)
    for i in range(0, ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + i
        mask = o_n < N * (row < n_rows).to(tl.int32)
        base = row.to(tl.int64) * N
        xv = tl.load(x + base + o_n, mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(xv * xv, axis=0) / N + eps)
        tl.store(y + base + o_n, (wv * _rnd(xv * r, DT)).to(DT), mask=mask)


def _row_warps(bn):
    return 4 if bn <= 1024 else (8 if bn <= 4096 else 16)


class OutNormGateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, z, weight, eps):
        o, z = o.contiguous(), z.contiguous()
        N = o.shape[-1]
        rows = o.numel() // N
        y = new_buffer(o)
        num_prog, per_prog = _programs(rows, MAX_PROGRAMS_FWD)
        BN = next_pow2(N)
        with device_guard(o):
            _out_norm_gate_fwd_kernel[(num_prog,)](o=o, z=z, w=weight, y=y, n_rows=rows, eps=eps,
                                                    ROWS_PER_PROG=per_prog, N=N, BN=BN, num_warps=_row_warps(BN))
        ctx.save_for_backward(o, z, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        o, z, weight = ctx.saved_tensors
        N = o.shape[-1]
        rows = o.numel() // N
        do, dz = new_buffer(o), new_buffer(z)
        num_prog, per_prog = _programs(rows, MAX_PROGRAMS_OUT_BWD)
        dw = new_buffer(o, (num_prog, N), torch.float32)
        BN = next_pow2(N)
        with device_guard(o):
            _out_norm_gate_bwd_kernel[(num_prog,)](o=o, z=z, w=weight, dy=dy.contiguous(), do=do, dz=dz,
                                                    dw_part=dw, n_rows=rows, eps=ctx.eps, ROWS_PER_PROG=per_prog,
                                                    N=N, BN=BN, num_warps=_row_warps(BN))
        return do, dz, dw.sum(0).to(weight.dtype), None


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, *, backend="auto"):
    """Per-head RMSNorm then RoPE on q and k; see the module docstring."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k must be [B, T, H, D] with equal B, T, D; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[-1] % 2:
        raise ValueError("RoPE needs an even head dim")
    if resolve_backend(backend, q) == "torch":
        return qk_norm_rope_torch(q, k, q_weight, k_weight, cos, sin, eps)
    return QKNormRopeFunction.apply(q, k, q_weight, k_weight, cos, sin, float(eps))


def rms_norm(x, weight, eps, *, backend="auto"):
    """HF RMSNorm over the last dim (``rms_norm_hf``), forward only: one launch for the reference's eight torch
    ops, which is what a decoded token's norms cost the host. Inputs that need gradients, or a weight whose dtype
    is not x's (the reference's output dtype then differs), take the reference."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [N] for x [..., N]; got {tuple(weight.shape)}, {tuple(x.shape)}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if resolve_backend(backend, x) == "torch" or needs_grad or weight.dtype != x.dtype:
        return rms_norm_hf(x, weight, eps)
    x = x.contiguous()
    N = x.shape[-1]
    rows = x.numel() // N
    y = new_buffer(x)
    num_prog, per_prog = _programs(rows, MAX_PROGRAMS_FWD)
    BN = next_pow2(N)
    with device_guard(x):
        _rms_norm_fwd_kernel[(num_prog,)](x=x, w=weight, y=y, n_rows=rows, eps=float(eps), ROWS_PER_PROG=per_prog,
                                          N=N, BN=BN, num_warps=_row_warps(BN))
    return y


def out_norm_gate(o, z, weight, eps, *, backend="auto"):
    """RMSNorm(o) * sigmoid(z) over the last dim; see the module docstring."""
    if o.shape != z.shape or weight.shape != (o.shape[-1],):
        raise ValueError(f"o, z must share a shape [..., N] and weight be [N]; got {tuple(o.shape)}, "
                         f"{tuple(z.shape)}, {tuple(weight.shape)}")
    if resolve_backend(backend, o) == "torch":
        return out_norm_gate_torch(o, z, weight, eps)
    return OutNormGateFunction.apply(o, z, weight, float(eps))
