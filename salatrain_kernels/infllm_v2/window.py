"""Local tile kernels of stage (c): each query row's contiguous key range, forward, dq and dk/dv.

Flash-attention style: a program takes BM consecutive queries of one head × BN keys per step, online softmax
in the exp2 domain, fp32 accumulators. A row's range is [lo(t), t]: dense rows (t < dense_len) lo = 0; with a
local window W > 0, sparse rows lo = first key of the window, i.e. of the block holding t-W+1, or under the
released rule (BLOCK_LOCAL) of the block W//BS blocks before t's, so the ~33 window blocks that neighbouring
queries share are read once per tile instead of once per query (W = 0: sparse rows belong to the gather
kernels). Under the sequence rule with documents on both sides of dense_len (PER_ROW_DENSE), a tile's or key
tile's document brings its own dense_len from a table. A sparse row's gathered part comes in as a normalised
partial output and lse2 (HAS_PART): the forward continues its softmax from them, dq adds the gathered dq.
Backward: dq per query tile; dk/dv per key tile (128 keys x 32-query steps for 16-bit inputs, as Triton's
flash-attention backward), the G heads of a group split over NSPLIT programs that add into fp32 buffers with
atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..utils import Tunable
from .attn_steps import (
    backward_rows, dkdv_update, dq_update, first_local_block, kv_tile, online_softmax, store_dkdv,
)


@triton.jit
def _local_start(t, dense_len, BS: tl.constexpr, WIN: tl.constexpr, BLOCK_LOCAL: tl.constexpr):
    """First key of a row's local range: 0 for dense rows; for sparse rows the first block of the window
    (WIN > 0) or t + 1, i.e. nothing (WIN = 0)."""
    if WIN > 0:
        sparse_lo = first_local_block(t, BS, WIN, BLOCK_LOCAL) * BS
    else:
        sparse_lo = t + 1
    return tl.where(t < dense_len, 0, sparse_lo)


@triton.jit
def _tile(tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr, row_dense_ptr, n_tiles, dense_len,
          stride_kr, stride_kh, G: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, WIN: tl.constexpr,
          BLOCK_LOCAL: tl.constexpr, PER_ROW_DENSE: tl.constexpr):
    """The program's tile of consecutive query rows of one head (latest tiles first): the head, first row and
    position, the K/V base of the head's group, last position, row offsets i, validity, positions t, first
    local keys lo and the tile's dense_len."""
    tile = n_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(tile_row0_ptr + tile)
    nrows = tl.load(tile_nrows_ptr + tile)
    if PER_ROW_DENSE:  # a tile holds rows of one document
        dense_len = tl.load(row_dense_ptr + row0)
    pos0 = tl.load(row_pos_ptr + row0)
    kv_base = tl.load(row_kbase_ptr + row0).to(tl.int64) * stride_kr + (h // G) * stride_kh
    t_last = pos0 + nrows - 1
    i = tl.arange(0, BM)
    r_ok = i < nrows
    t = pos0 + i
    lo = _local_start(t, dense_len, BS, WIN, BLOCK_LOCAL)
    return h, row0, pos0, kv_base, t_last, i, r_ok, t, lo, dense_len


@triton.jit
def _key_steps(pos0, t_last, dense_len, BN: tl.constexpr, BS: tl.constexpr, WIN: tl.constexpr,
               BLOCK_LOCAL: tl.constexpr):
    """Key tiles of a query tile: [k_lo, u0) and [u1, t_last] need the row masks, [u0, u1) lies inside every
    row's range (the first local key never decreases with t)."""
    k_lo = (_local_start(pos0, dense_len, BS, WIN, BLOCK_LOCAL) // BN) * BN
    u0 = tl.maximum(((_local_start(t_last, dense_len, BS, WIN, BLOCK_LOCAL) + BN - 1) // BN) * BN, k_lo)
    u1 = tl.maximum((pos0 // BN) * BN, u0)
    return k_lo, u0, u1


@triton.jit
def _key_tile(k_ptr, kv_base, j0, t_last, d, dm, stride_kr, BN: tl.constexpr, MASKED: tl.constexpr):
    """Keys j0.. of a step: positions, offsets, load mask and the K tile."""
    kp = j0 + tl.arange(0, BN)
    kv_off = kv_base + kp.to(tl.int64) * stride_kr
    if MASKED:
        ld_mask = (kp <= t_last)[:, None] & dm[None, :]
    else:
        ld_mask = dm[None, :]
    kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    return kp, kv_off, ld_mask, kt


@triton.jit
def _fwd_step(q, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, m_i, l_i, acc, d, dm, scale_log2,
              stride_kr, BN: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    kp, kv_off, ld_mask, kt = _key_tile(k_ptr, kv_base, j0, t_last, d, dm, stride_kr, BN, MASKED)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
    if MASKED:
        s = tl.where((kp[None, :] <= t[:, None]) & (kp[None, :] >= lo[:, None]), s, float("-inf"))
    m_new, alpha, p, l_i = online_softmax(s, m_i, l_i)
    vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _local_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr, row_dense_ptr,
    n_tiles, part_row_base, dense_len,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_or, stride_oh, stride_lr, stride_pr, stride_ph, stride_plr,
    scale_log2,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    WIN: tl.constexpr, HAS_PART: tl.constexpr, PREC: tl.constexpr, BLOCK_LOCAL: tl.constexpr,
    PER_ROW_DENSE: tl.constexpr,
):
    h, row0, pos0, kv_base, t_last, i, r_ok, t, lo, dense_len = _tile(
        tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr, row_dense_ptr, n_tiles, dense_len,
        stride_kr, stride_kh, G, BM, BS, WIN, BLOCK_LOCAL, PER_ROW_DENSE)
    d = tl.arange(0, BD)
    dm = d < D
    rows = (row0 + i).to(tl.int64)
    q = tl.load(q_ptr + (rows * stride_qr + h * stride_qh)[:, None] + d[None, :],
                mask=r_ok[:, None] & dm[None, :], other=0.0)
    if HAS_PART:  # continue the softmax of the gathered blocks (sparse rows)
        prow = (row0 + i - part_row_base).to(tl.int64)
        part_lse = tl.load(part_lse_ptr + prow * stride_plr + h, mask=r_ok & (t >= dense_len), other=float("inf"))
        has = part_lse < float("inf")
        m_i = tl.where(has, part_lse, float("-inf"))
        l_i = tl.where(has, 1.0, 0.0)
        acc = tl.load(part_o_ptr + (prow * stride_pr + h * stride_ph)[:, None] + d[None, :],
                      mask=has[:, None] & dm[None, :], other=0.0).to(tl.float32)
    else:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.full([BM], 0.0, tl.float32)
        acc = tl.full([BM, BD], 0.0, tl.float32)
    k_lo, u0, u1 = _key_steps(pos0, t_last, dense_len, BN, BS, WIN, BLOCK_LOCAL)
    for j0 in range(k_lo, u0, BN):
        m_i, l_i, acc = _fwd_step(q, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, m_i, l_i, acc, d, dm, scale_log2,
                                  stride_kr, BN, True, PREC)
    for j0 in range(u0, u1, BN):
        m_i, l_i, acc = _fwd_step(q, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, m_i, l_i, acc, d, dm, scale_log2,
                                  stride_kr, BN, False, PREC)
    for j0 in range(u1, t_last + 1, BN):
        m_i, l_i, acc = _fwd_step(q, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, m_i, l_i, acc, d, dm, scale_log2,
                                  stride_kr, BN, True, PREC)
    l_ok = l_i > 0
    l_div = tl.where(l_ok, l_i, 1.0)
    o = acc / l_div[:, None]
    mine = r_ok & ((t < dense_len) | (WIN > 0))  # WIN = 0: sparse rows belong to the gather kernel
    tl.store(o_ptr + (rows * stride_or + h * stride_oh)[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mine[:, None] & dm[None, :])
    tl.store(lse_ptr + rows * stride_lr + h, tl.where(l_ok, m_i + tl.log2(l_div), float("inf")), mask=mine)


@triton.jit
def _dq_step(q, do, lse, delta, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, dq, d, dm, scale_log2,
             stride_kr, BN: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    kp, kv_off, ld_mask, kt = _key_tile(k_ptr, kv_base, j0, t_last, d, dm, stride_kr, BN, MASKED)
    vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where((kp[None, :] <= t[:, None]) & (kp[None, :] >= lo[:, None]), p, 0.0)
    return dq_update(dq, p, do, kt, vt, delta, PREC)


@triton.jit
def _local_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, part_ptr,
    tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr, row_dense_ptr,
    n_tiles, part_row_base, dense_len,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_pr, stride_ph,
    scale_log2, scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    WIN: tl.constexpr, HAS_PART: tl.constexpr, PREC: tl.constexpr, BLOCK_LOCAL: tl.constexpr,
    PER_ROW_DENSE: tl.constexpr,
):
    h, row0, pos0, kv_base, t_last, i, r_ok, t, lo, dense_len = _tile(
        tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr, row_dense_ptr, n_tiles, dense_len,
        stride_kr, stride_kh, G, BM, BS, WIN, BLOCK_LOCAL, PER_ROW_DENSE)
    d = tl.arange(0, BD)
    dm = d < D
    rows = (row0 + i).to(tl.int64)
    qd_off, qd_mask, q, do, lse, delta = backward_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, rows, h, r_ok, d, dm,
                                                       stride_qr, stride_qh, stride_lr)
    dq = tl.full([BM, BD], 0.0, tl.float32)
    k_lo, u0, u1 = _key_steps(pos0, t_last, dense_len, BN, BS, WIN, BLOCK_LOCAL)
    for j0 in range(k_lo, u0, BN):
        dq = _dq_step(q, do, lse, delta, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, dq, d, dm, scale_log2,
                      stride_kr, BN, True, PREC)
    for j0 in range(u0, u1, BN):
        dq = _dq_step(q, do, lse, delta, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, dq, d, dm, scale_log2,
                      stride_kr, BN, False, PREC)
    for j0 in range(u1, t_last + 1, BN):
        dq = _dq_step(q, do, lse, delta, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, dq, d, dm, scale_log2,
                      stride_kr, BN, True, PREC)
    dq = dq * scale
    if HAS_PART:  # add the gathered blocks' part (sparse rows)
        prow = (row0 + i - part_row_base).to(tl.int64)
        sparse = r_ok & (t >= dense_len)
        dq += tl.load(part_ptr + (prow * stride_pr + h * stride_ph)[:, None] + d[None, :],
                      mask=sparse[:, None] & dm[None, :], other=0.0)
    mine = r_ok & ((t < dense_len) | (WIN > 0))
    tl.store(dq_ptr + qd_off, dq.to(dq_ptr.dtype.element_ty), mask=mine[:, None] & dm[None, :])


@triton.jit
def _local_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    ktile_doc_ptr, ktile_start_ptr, doc_kstart_ptr, doc_len_ptr, doc_qstart_ptr, doc_qpos0_ptr, doc_qend_ptr,
    doc_dense_ptr, dense_len,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_dkr, stride_dkh,
    scale_log2, scale,
    G: tl.constexpr, NSPLIT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, WIN: tl.constexpr, PREC: tl.constexpr, BLOCK_LOCAL: tl.constexpr,
    PER_ROW_DENSE: tl.constexpr,
):
    kt_id = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    doc = tl.load(ktile_doc_ptr + kt_id)
    j0 = tl.load(ktile_start_ptr + kt_id)
    kstart = tl.load(doc_kstart_ptr + doc)
    length = tl.load(doc_len_ptr + doc)
    qstart = tl.load(doc_qstart_ptr + doc)
    qpos0 = tl.load(doc_qpos0_ptr + doc)
    qend = tl.load(doc_qend_ptr + doc)  # queries of the document: positions [qpos0, qend)
    if PER_ROW_DENSE:
        dense_len = tl.load(doc_dense_ptr + doc)
    kp = j0 + tl.arange(0, BN)
    k_ok = kp < length
    j_last = tl.minimum(j0 + BN, length) - 1
    q_hi = tl.minimum(qend, dense_len)  # dense queries, then the sparse ones whose window reaches this tile
    if WIN > 0:  # the first query whose window starts after this tile's last block
        if BLOCK_LOCAL:
            reach = (j_last // BS + 1 + WIN // BS) * BS
        else:
            reach = (j_last // BS + 1) * BS + WIN - 1
        q_hi = tl.minimum(qend, tl.maximum(q_hi, reach))
    d = tl.arange(0, BD)
    dm = d < D
    kt, vt = kv_tile(k_ptr, v_ptr, kstart + kp, k_ok, hk, d, dm, stride_kr, stride_kh)
    dk = tl.full([BN, BD], 0.0, tl.float32)
    dv = tl.full([BN, BD], 0.0, tl.float32)
    im = tl.arange(0, BM)
    p_start = tl.maximum(j0, qpos0)
    for g in range(split, G, NSPLIT):
        h = hk * G + g
        for p0 in range(p_start, q_hi, BM):
            tq = p0 + im
            q_ok = tq < q_hi
            lo = _local_start(tq, dense_len, BS, WIN, BLOCK_LOCAL)
            rows = (qstart + tq - qpos0).to(tl.int64)
            _, _, q, do, lse, delta = backward_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, rows, h, q_ok, d, dm,
                                                    stride_qr, stride_qh, stride_lr)
            s_t = tl.dot(kt, tl.trans(q), input_precision=PREC) * scale_log2  # [BN, BM]
            vis = (kp[:, None] <= tq[None, :]) & (kp[:, None] >= lo[None, :]) & k_ok[:, None] & q_ok[None, :]
            dk, dv, _ = dkdv_update(dk, dv, s_t, vis, q, do, vt, lse, delta, PREC)
    store_dkdv(dk_ptr, dv_ptr, dk, dv, kstart + kp, k_ok, hk, d, dm, scale, stride_dkr, stride_dkh, True)


local_fwd = Tunable(_local_fwd_kernel, [(8, 3), (8, 2)],
                    key=["G", "D", "BM", "WIN", "HAS_PART", "BLOCK_LOCAL", "PER_ROW_DENSE"])
