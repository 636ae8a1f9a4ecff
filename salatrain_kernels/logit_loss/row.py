"""Row-wise logit losses in one Triton program per row: two passes over the vocabulary (online log-sum-exp,
then loss and gradient), 16-bit logits read twice and the gradient written once, in place when asked.
Semantics and the reference: ``naive.py``. Against the PyTorch composition (fp32 copies, log_softmax of both,
exp, products, the softmax again for the gradient: ~15 passes over fp32 [m, V] tensors) it moves ~6× fewer
bytes, which is what the loss costs: it is memory-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import device_guard, next_pow2

BLOCK_V = 4096


@triton.jit
def _logit_loss_kernel(S, T, TGT, LOSS, CE, G, stride_s, stride_t, stride_g, V, inv_temp, temp,
                       HAS_TEACHER: tl.constexpr, SAME_T: tl.constexpr, WRITE_GRAD: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    tgt = tl.load(TGT + row)
    neg_inf = float("-inf")
    # pass 1: log-sum-exp of s/T (and of s at T = 1 when T != 1), of t/T, and the target's logit
    m_s = tl.full((), neg_inf, tl.float32)
    l_s = tl.zeros((), tl.float32)
    m_c = tl.full((), neg_inf, tl.float32)
    l_c = tl.zeros((), tl.float32)
    m_t = tl.full((), neg_inf, tl.float32)
    l_t = tl.zeros((), tl.float32)
    s_tgt = tl.zeros((), tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(tl.float32)
        s_tgt += tl.sum(tl.where(cols == tgt, s, 0.0), axis=0)
        x = s * inv_temp
        m_new = tl.maximum(m_s, tl.max(x, axis=0))
        l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m_s = m_new
        if not SAME_T:
            mc_new = tl.maximum(m_c, tl.max(s, axis=0))
            l_c = l_c * tl.exp(m_c - mc_new) + tl.sum(tl.exp(s - mc_new), axis=0)
            m_c = mc_new
        if HAS_TEACHER:
            y = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32) * inv_temp
            mt_new = tl.maximum(m_t, tl.max(y, axis=0))
            l_t = l_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(y - mt_new), axis=0)
            m_t = mt_new
    lse_s = m_s + tl.log(l_s)
    if SAME_T:
        lse_c = lse_s
    else:
        lse_c = m_c + tl.log(l_c)
    ce = lse_c - s_tgt
    tl.store(CE + row, ce)
    # pass 2: KL terms and the gradient
    kl = tl.zeros((), tl.float32)
    if HAS_TEACHER or WRITE_GRAD:
        if HAS_TEACHER:
            lse_t = m_t + tl.log(l_t)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            log_ps = s * inv_temp - lse_s
            ps = tl.exp(log_ps)
            if HAS_TEACHER:
                log_pt = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_t
                pt = tl.exp(log_pt)
                kl += tl.sum(tl.where(mask, pt * (log_pt - log_ps), 0.0), axis=0)
                g = temp * (ps - pt)
            else:
                g = ps - tl.where(cols == tgt, 1.0, 0.0)
            if WRITE_GRAD:
                tl.store(G + row * stride_g + cols, g.to(G.dtype.element_ty), mask=mask)
    if HAS_TEACHER:
        tl.store(LOSS + row, kl * temp * temp)
    else:
        tl.store(LOSS + row, ce)


def logit_loss_rows_triton(logits, teacher, target, temperature=1.0, grad_out=None):
    m, V = logits.shape
    if logits.stride(-1) != 1 or (teacher is not None and teacher.stride(-1) != 1) or (
            grad_out is not None and grad_out.stride(-1) != 1):
        raise ValueError("logit rows must be contiguous in the vocabulary dimension")
    loss = torch.empty(m, dtype=torch.float32, device=logits.device)
    ce = torch.empty(m, dtype=torch.float32, device=logits.device)
    if m == 0:
        return loss, ce
    has_teacher = teacher is not None
    temp = float(temperature) if has_teacher else 1.0
    t = teacher if has_teacher else logits
    g = grad_out if grad_out is not None else logits
    block = min(BLOCK_V, next_pow2(V))
    with device_guard(logits):
        _logit_loss_kernel[(m,)](S=logits, T=t, TGT=target.contiguous(), LOSS=loss, CE=ce, G=g,
                                 stride_s=logits.stride(0), stride_t=t.stride(0), stride_g=g.stride(0), V=V,
                                 inv_temp=1.0 / temp, temp=temp, HAS_TEACHER=has_teacher, SAME_T=temp == 1.0,
                                 WRITE_GRAD=grad_out is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss, ce
