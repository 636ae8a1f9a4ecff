"""The steps the attention kernels (window.py, gather.py; score.py uses the softmax update, selection.py the local
window) share, as @triton.jit helpers inlined where they are called: the first block of a sparse row's local
window under either rule, the online-softmax update in the exp2 domain, the backward inputs of a set of query
rows, the K/V tile of a dk/dv program, the dq and dk/dv accumulations, and the atomic dk/dv store.

Softmax statistics are log2-sum-exp2 values ("lse2") of scale·q·k·log2(e); a row without any visible key has
lse2 = +inf, which makes its output and its gradients 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import interpreting, row_max, row_sum


@triton.jit
def first_local_block(t, BS: tl.constexpr, WIN: tl.constexpr, BLOCK_LOCAL: tl.constexpr):
    """First block of the local window of a query at position t (the window ends at t's block): the block holding
    t - WIN + 1 (local_blocks="token"), or WIN // BS blocks before t's block (BLOCK_LOCAL, "block")."""
    if BLOCK_LOCAL:
        first = tl.maximum(t // BS - WIN // BS, 0)
    else:
        first = tl.maximum(t - WIN + 1, 0) // BS
    return first


@triton.jit
def online_softmax(s, m_i, l_i):
    """One online-softmax step over scores s [rows, keys]: new running max, the factor that rescales what was
    accumulated before, the step's probabilities and the new running sum."""
    m_new = tl.maximum(m_i, row_max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + row_sum(p, 1)
    return m_new, alpha, p, l_i


@triton.jit
def backward_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, rows, heads, ok, d, dm, stride_qr, stride_qh, stride_lr):
    """Backward inputs of query rows (int64) × heads, masked by ok: the q/dO offsets and mask, q, dO, lse2, delta."""
    qd_off = (rows * stride_qr + heads * stride_qh)[:, None] + d[None, :]
    qd_mask = ok[:, None] & dm[None, :]
    q = tl.load(q_ptr + qd_off, mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + qd_off, mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + rows * stride_lr + heads, mask=ok, other=float("inf"))
    delta = tl.load(delta_ptr + rows * stride_lr + heads, mask=ok, other=0.0)
    return qd_off, qd_mask, q, do, lse, delta


@triton.jit
def dq_update(dq, p, do, kt, vt, delta, PREC: tl.constexpr):
    """dq += dS · K with dS = P ⊙ (dO·Vᵀ − delta), for probabilities p [rows, keys] of keys kt, vt."""
    dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)


@triton.jit
def dkdv_update(dk, dv, s_t, vis, q, do, vt, lse, delta, PREC: tl.constexpr):
    """dv += Pᵀ·dO and dk += dSᵀ·Q for the transposed scores s_t [keys, rows] (visible where vis); also returns
    dSᵀ [keys, rows] (in q's dtype), from which a caller may take the rows' dq part dS·K."""
    p_t = tl.where(vis, tl.exp2(s_t - lse[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(vt, tl.trans(do), input_precision=PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=PREC)
    return dk, dv, ds_t


def kv_descriptors(k3: torch.Tensor, v3: torch.Tensor, block_size: int, block_d: int):
    """Tensor descriptors over K and V [rows, heads, D] for loads of one block's rows of one head
    ([block_size, 1, block_d]; columns past D and rows past the tensor read as 0), or None where bulk tensor copies
    cannot take them: a GPU before Hopper, a Triton without host tensor descriptors (< 3.3), a head dim that is not a
    power of two, or a base or a row/head stride not 16-byte aligned."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    if k3.is_cuda and torch.cuda.get_device_capability(k3.device)[0] < 9:
        return None
    if not (k3.is_cuda or interpreting()):
        return None
    if k3.shape[-1] != block_d:  # a head dim that is not a power of two: the box would be wider than the rows
        return None
    for x in (k3, v3):
        size = x.element_size()
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any(st * size % 16 for st in x.stride()[:-1]):
            return None
    return tuple(TensorDescriptor.from_tensor(x, [block_size, 1, block_d]) for x in (k3, v3))


@triton.jit
def key_rows(ptr, desc, off, ok, row0, hk, d, dm, BS: tl.constexpr, BD: tl.constexpr, DESC: tl.constexpr,
             FULL: tl.constexpr):
    """One gathered block's BS rows of K or V [BS, BD]: by pointers at element offsets off (rows not ok read as 0),
    or, with DESC, from the tensor descriptor over [rows, heads, D] at key row row0 of head hk (one bulk tensor copy
    on Hopper; rows past the tensor read as 0). Descriptor rows not ok are zeroed unless FULL says every row is:
    a masked probability (0) times a non-finite K or V value would still be NaN."""
    if DESC:
        x = tl.reshape(desc.load([row0, hk, 0]), (BS, BD))
        if not FULL:
            x = tl.where(ok[:, None], x, tl.zeros_like(x))
    else:
        x = tl.load(ptr + off[:, None] + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
    return x


@triton.jit
def kv_tile(k_ptr, v_ptr, key_rows, k_ok, hk, d, dm, stride_kr, stride_kh):
    """The K and V tiles [keys, D] of key rows (of KV head hk) whose dk/dv a backward program accumulates."""
    kv_off = key_rows.to(tl.int64) * stride_kr + hk * stride_kh
    kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
    vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
    return kt, vt


@triton.jit
def store_dkdv(dk_ptr, dv_ptr, dk, dv, key_rows, k_ok, hk, d, dm, scale, stride_dkr, stride_dkh,
               ATOMIC: tl.constexpr):
    """Add a key tile's dk (times scale) and dv into the fp32 buffers: by atomics where other programs of the same
    launch add to the same rows, else by a plain read-add-write (ATOMIC False: this program owns the rows)."""
    out_off = key_rows.to(tl.int64)[:, None] * stride_dkr + hk * stride_dkh + d[None, :]
    out_mask = k_ok[:, None] & dm[None, :]
    if ATOMIC:
        tl.atomic_add(dk_ptr + out_off, dk * scale, mask=out_mask)
        tl.atomic_add(dv_ptr + out_off, dv, mask=out_mask)
    else:
        tl.store(dk_ptr + out_off, tl.load(dk_ptr + out_off, mask=out_mask, other=0.0) + dk * scale, mask=out_mask)
        tl.store(dv_ptr + out_off, tl.load(dv_ptr + out_off, mask=out_mask, other=0.0) + dv, mask=out_mask)
