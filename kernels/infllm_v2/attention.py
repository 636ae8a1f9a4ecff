"""Stage (c): attention over given blocks, forward and backward, plus the dense path (t < dense_len).

Rows at position t < dense_len ("dense rows") attend to every key <= t; the rest ("sparse rows") attend to
the blocks listed for them in block_idx, causal inside the current block. The two row sets are disjoint,
so each output / dq row is written by exactly one kernel.

Dense rows: a flash-attention tile kernel (BM consecutive queries of one head × BN keys, online softmax in
the exp2 domain, fp32 accumulators). Its backward is FA2-style: dq per query tile, dk/dv per key tile with
the G heads of a group split over NSPLIT programs that add into fp32 buffers with atomics.

Sparse rows: one program per (query, KV group) holds the G heads of the group as the rows of a
[M, D] tile (M = G rounded up to a power of two, at least 16 for tl.dot) and walks the query's block list,
loading each K/V block once for the whole group. For G < 16 the tile is padded to 16 rows: the MMA does
16/G times the useful work, while memory traffic per (query, group) — the real cost of gathered blocks —
is unchanged. dq walks the same lists. dk/dv use the transposed map: all (group, block, query) entries of
the lists sorted by (group, block) with torch.sort, cut into chunks of at most CHUNK queries; one program
per chunk loads its K/V block once, gathers the queries' q/dO rows (TP queries × G heads per step) and adds
its dk/dv into fp32 buffers with atomics (order of additions, hence the last bits of dk/dv, may vary).

Softmax statistics are kept as log2-sum-exp2 of scale·q·k·log2(e) ("lse2", fp32 [R, HQ]); a row without
any visible key outputs 0 and gets lse2 = +inf (zero gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import (
    LOG2E,
    DocLayout,
    check_qkv,
    dot_precision,
    interpreting,
    new_empty,
    next_pow2,
    row_max,
    row_sum,
)
from .naive import infllmv2_block_attn_naive

__all__ = ["infllmv2_block_attn", "AttnPlan", "SparseAttnFn"]

DKDV_CHUNK = 256  # queries per dk/dv program of one block (bounds the work of heavily selected blocks)


# ----------------------------------------------------------------------------------------------- dense rows
@triton.jit
def _dense_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr,
    n_tiles,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_or, stride_oh, stride_lr,
    scale_log2,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    tile = n_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    row0 = tl.load(tile_row0_ptr + tile)
    nrows = tl.load(tile_nrows_ptr + tile)
    pos0 = tl.load(row_pos_ptr + row0)
    kbase = tl.load(row_kbase_ptr + row0)
    t_last = pos0 + nrows - 1
    i = tl.arange(0, BM)
    r_ok = i < nrows
    t = pos0 + i
    d = tl.arange(0, BD)
    dm = d < D
    rows = (row0 + i).to(tl.int64)
    q = tl.load(q_ptr + (rows * stride_qr + h * stride_qh)[:, None] + d[None, :],
                mask=r_ok[:, None] & dm[None, :], other=0.0)
    jn = tl.arange(0, BN)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.full([BM], 0.0, tl.float32)
    acc = tl.full([BM, BD], 0.0, tl.float32)
    n_full = (pos0 // BN) * BN  # keys below every query of the tile: no mask
    for j0 in range(0, n_full, BN):
        kv_off = (kbase + j0 + jn).to(tl.int64) * stride_kr + hk * stride_kh
        kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        m_new = tl.maximum(m_i, row_max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + row_sum(p, 1)
        vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    for j0 in range(n_full, t_last + 1, BN):
        kp = j0 + jn
        k_ok = kp <= t_last
        kv_off = (kbase + kp).to(tl.int64) * stride_kr + hk * stride_kh
        kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        s = tl.where(kp[None, :] <= t[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, row_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + row_sum(p, 1)
        vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    l_ok = l_i > 0
    l_div = tl.where(l_ok, l_i, 1.0)
    o = acc / l_div[:, None]
    tl.store(o_ptr + (rows * stride_or + h * stride_oh)[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & dm[None, :])
    tl.store(lse_ptr + rows * stride_lr + h, tl.where(l_ok, m_i + tl.log2(l_div), float("inf")), mask=r_ok)


@triton.jit
def _dense_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr,
    n_tiles,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr,
    scale_log2, scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    tile = n_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G
    row0 = tl.load(tile_row0_ptr + tile)
    nrows = tl.load(tile_nrows_ptr + tile)
    pos0 = tl.load(row_pos_ptr + row0)
    kbase = tl.load(row_kbase_ptr + row0)
    t_last = pos0 + nrows - 1
    i = tl.arange(0, BM)
    r_ok = i < nrows
    t = pos0 + i
    d = tl.arange(0, BD)
    dm = d < D
    rows = (row0 + i).to(tl.int64)
    qd_off = (rows * stride_qr + h * stride_qh)[:, None] + d[None, :]
    qd_mask = r_ok[:, None] & dm[None, :]
    q = tl.load(q_ptr + qd_off, mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + qd_off, mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + rows * stride_lr + h, mask=r_ok, other=float("inf"))
    delta = tl.load(delta_ptr + rows * stride_lr + h, mask=r_ok, other=0.0)
    jn = tl.arange(0, BN)
    dq = tl.full([BM, BD], 0.0, tl.float32)
    for j0 in range(0, t_last + 1, BN):
        kp = j0 + jn
        k_ok = kp <= t_last
        kv_off = (kbase + kp).to(tl.int64) * stride_kr + hk * stride_kh
        kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        p = tl.where(kp[None, :] <= t[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    tl.store(dq_ptr + qd_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dense_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    ktile_doc_ptr, ktile_start_ptr, doc_kstart_ptr, doc_qstart_ptr, doc_qpos0_ptr, doc_qhi_ptr,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_dkr, stride_dkh,
    scale_log2, scale,
    G: tl.constexpr, NSPLIT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, PREC: tl.constexpr,
):
    kt_id = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    doc = tl.load(ktile_doc_ptr + kt_id)
    j0 = tl.load(ktile_start_ptr + kt_id)
    kstart = tl.load(doc_kstart_ptr + doc)
    qstart = tl.load(doc_qstart_ptr + doc)
    qpos0 = tl.load(doc_qpos0_ptr + doc)
    qhi = tl.load(doc_qhi_ptr + doc)  # dense queries of the document: positions [qpos0, qhi)
    kp = j0 + tl.arange(0, BN)
    k_ok = kp < qhi
    d = tl.arange(0, BD)
    dm = d < D
    kv_off = (kstart + kp).to(tl.int64) * stride_kr + hk * stride_kh
    kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
    vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
    dk = tl.full([BN, BD], 0.0, tl.float32)
    dv = tl.full([BN, BD], 0.0, tl.float32)
    im = tl.arange(0, BM)
    p_start = tl.maximum(j0, qpos0)
    for g in range(split, G, NSPLIT):
        h = hk * G + g
        for p0 in range(p_start, qhi, BM):
            tq = p0 + im
            q_ok = tq < qhi
            rows = (qstart + tq - qpos0).to(tl.int64)
            qd_off = (rows * stride_qr + h * stride_qh)[:, None] + d[None, :]
            q = tl.load(q_ptr + qd_off, mask=q_ok[:, None] & dm[None, :], other=0.0)
            do = tl.load(do_ptr + qd_off, mask=q_ok[:, None] & dm[None, :], other=0.0)
            lse = tl.load(lse_ptr + rows * stride_lr + h, mask=q_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows * stride_lr + h, mask=q_ok, other=0.0)
            s_t = tl.dot(kt, tl.trans(q), input_precision=PREC) * scale_log2  # [BN, BM]
            vis = (kp[:, None] <= tq[None, :]) & k_ok[:, None]
            p_t = tl.where(vis, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
            dp_t = tl.dot(vt, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    out_off = (kstart + kp).to(tl.int64)[:, None] * stride_dkr + hk * stride_dkh + d[None, :]
    out_mask = k_ok[:, None] & dm[None, :]
    tl.atomic_add(dk_ptr + out_off, dk * scale, mask=out_mask)
    tl.atomic_add(dv_ptr + out_off, dv, mask=out_mask)


# ---------------------------------------------------------------------------------------------- sparse rows
@triton.jit
def _gather_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, count_ptr,
    rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_or, stride_oh, stride_lr, stride_ih, stride_ir, stride_ch,
    scale_log2,
    G: tl.constexpr, M: tl.constexpr, TOK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    NBI: tl.constexpr, PREC: tl.constexpr,
):
    # rows of the tile: TOK queries x M head slots; keys: TOK x (NBI blocks of BS keys), block-diagonal
    BN: tl.constexpr = NBI * BS
    hk = tl.program_id(1)
    mm = tl.arange(0, TOK * M)
    tok_m = mm // M
    g = mm % M
    heads = hk * G + g
    row_m_ok = (tl.program_id(0) * TOK + tok_m < n_rows) & (g < G)
    r_m = tl.load(rows_ptr + tl.program_id(0) * TOK + tok_m, mask=row_m_ok, other=0).to(tl.int64)
    kk = tl.arange(0, TOK * BN)
    tok_k = kk // BN
    jj = kk % BN
    tok_k_ok = tl.program_id(0) * TOK + tok_k < n_rows
    r_k = tl.load(rows_ptr + tl.program_id(0) * TOK + tok_k, mask=tok_k_ok, other=0)
    t_k = tl.load(row_pos_ptr + r_k, mask=tok_k_ok, other=0)
    kbase_k = tl.load(row_kbase_ptr + r_k, mask=tok_k_ok, other=0)
    n_k = tl.load(count_ptr + hk * stride_ch + r_k, mask=tok_k_ok, other=0)
    idx_k = idx_ptr + hk * stride_ih + r_k.to(tl.int64) * stride_ir
    n_max = row_max(n_k, 0)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + (r_m * stride_qr + heads * stride_qh)[:, None] + d[None, :],
                mask=row_m_ok[:, None] & dm[None, :], other=0.0)
    same_tok = tok_m[:, None] == tok_k[None, :]
    m_i = tl.full([TOK * M], float("-inf"), tl.float32)
    l_i = tl.full([TOK * M], 0.0, tl.float32)
    acc = tl.full([TOK * M, BD], 0.0, tl.float32)
    for s0 in range(0, n_max, NBI):
        slot = s0 + jj // BS
        s_ok = slot < n_k
        blk = tl.load(idx_k + slot, mask=s_ok, other=0)
        kp = blk * BS + jj % BS
        k_ok = s_ok & (kp <= t_k)
        kv_off = (kbase_k + kp).to(tl.int64) * stride_kr + hk * stride_kh
        kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        s = tl.where(same_tok & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, row_max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + row_sum(p, 1)
        vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    l_ok = l_i > 0
    l_div = tl.where(l_ok, l_i, 1.0)
    o = acc / l_div[:, None]
    tl.store(o_ptr + (r_m * stride_or + heads * stride_oh)[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_m_ok[:, None] & dm[None, :])
    tl.store(lse_ptr + r_m * stride_lr + heads, tl.where(l_ok, m_i + tl.log2(l_div), float("inf")), mask=row_m_ok)


@triton.jit
def _gather_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, count_ptr,
    rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_ih, stride_ir, stride_ch,
    scale_log2, scale,
    G: tl.constexpr, M: tl.constexpr, TOK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    NBI: tl.constexpr, PREC: tl.constexpr,
):
    BN: tl.constexpr = NBI * BS
    hk = tl.program_id(1)
    mm = tl.arange(0, TOK * M)
    tok_m = mm // M
    g = mm % M
    heads = hk * G + g
    row_m_ok = (tl.program_id(0) * TOK + tok_m < n_rows) & (g < G)
    r_m = tl.load(rows_ptr + tl.program_id(0) * TOK + tok_m, mask=row_m_ok, other=0).to(tl.int64)
    kk = tl.arange(0, TOK * BN)
    tok_k = kk // BN
    jj = kk % BN
    tok_k_ok = tl.program_id(0) * TOK + tok_k < n_rows
    r_k = tl.load(rows_ptr + tl.program_id(0) * TOK + tok_k, mask=tok_k_ok, other=0)
    t_k = tl.load(row_pos_ptr + r_k, mask=tok_k_ok, other=0)
    kbase_k = tl.load(row_kbase_ptr + r_k, mask=tok_k_ok, other=0)
    n_k = tl.load(count_ptr + hk * stride_ch + r_k, mask=tok_k_ok, other=0)
    idx_k = idx_ptr + hk * stride_ih + r_k.to(tl.int64) * stride_ir
    n_max = row_max(n_k, 0)
    d = tl.arange(0, BD)
    dm = d < D
    qd_off = (r_m * stride_qr + heads * stride_qh)[:, None] + d[None, :]
    qd_mask = row_m_ok[:, None] & dm[None, :]
    q = tl.load(q_ptr + qd_off, mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + qd_off, mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + r_m * stride_lr + heads, mask=row_m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + r_m * stride_lr + heads, mask=row_m_ok, other=0.0)
    same_tok = tok_m[:, None] == tok_k[None, :]
    dq = tl.full([TOK * M, BD], 0.0, tl.float32)
    for s0 in range(0, n_max, NBI):
        slot = s0 + jj // BS
        s_ok = slot < n_k
        blk = tl.load(idx_k + slot, mask=s_ok, other=0)
        kp = blk * BS + jj % BS
        k_ok = s_ok & (kp <= t_k)
        kv_off = (kbase_k + kp).to(tl.int64) * stride_kr + hk * stride_kh
        kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        p = tl.where(same_tok & k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    tl.store(dq_ptr + qd_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _gather_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    chunk_key_ptr, chunk_e0_ptr, chunk_e1_ptr, entry_row_ptr, gb_krow0_ptr, gb_kend_ptr,
    row_pos_ptr, row_kbase_ptr,
    num_gblocks,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_dkr, stride_dkh,
    scale_log2, scale,
    G: tl.constexpr, GP: tl.constexpr, TP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr,
):
    M: tl.constexpr = TP * GP
    c = tl.program_id(0)
    key = tl.load(chunk_key_ptr + c)
    e0 = tl.load(chunk_e0_ptr + c)
    e1 = tl.load(chunk_e1_ptr + c)
    hk = key // num_gblocks
    gb = key % num_gblocks
    krow0 = tl.load(gb_krow0_ptr + gb)
    kend = tl.load(gb_kend_ptr + gb)
    krow = krow0 + tl.arange(0, BS)
    k_ok = krow < kend
    d = tl.arange(0, BD)
    dm = d < D
    kv_off = krow.to(tl.int64) * stride_kr + hk * stride_kh
    kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
    vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
    dk = tl.full([BS, BD], 0.0, tl.float32)
    dv = tl.full([BS, BD], 0.0, tl.float32)
    mm = tl.arange(0, M)
    ti = mm // GP
    g = mm % GP
    heads = hk * G + g
    for e in range(e0, e1, TP):
        ent = e + ti
        e_ok = (ent < e1) & (g < G)
        r = tl.load(entry_row_ptr + ent, mask=e_ok, other=0)
        q_krow = tl.load(row_kbase_ptr + r, mask=e_ok, other=0) + tl.load(row_pos_ptr + r, mask=e_ok, other=0)
        r64 = r.to(tl.int64)
        qd_off = (r64 * stride_qr + heads * stride_qh)[:, None] + d[None, :]
        qd_mask = e_ok[:, None] & dm[None, :]
        q = tl.load(q_ptr + qd_off, mask=qd_mask, other=0.0)
        do = tl.load(do_ptr + qd_off, mask=qd_mask, other=0.0)
        lse = tl.load(lse_ptr + r64 * stride_lr + heads, mask=e_ok, other=float("inf"))
        delta = tl.load(delta_ptr + r64 * stride_lr + heads, mask=e_ok, other=0.0)
        s_t = tl.dot(kt, tl.trans(q), input_precision=PREC) * scale_log2  # [BS, M]
        vis = (krow[:, None] <= q_krow[None, :]) & k_ok[:, None] & e_ok[None, :]
        p_t = tl.where(vis, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(vt, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    out_off = krow.to(tl.int64)[:, None] * stride_dkr + hk * stride_dkh + d[None, :]
    out_mask = k_ok[:, None] & dm[None, :]
    tl.atomic_add(dk_ptr + out_off, dk * scale, mask=out_mask)
    tl.atomic_add(dv_ptr + out_off, dv, mask=out_mask)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, n, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr):
    """delta[i] = sum_d o[i, d] · do[i, d] over the flattened (row, head) pairs."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, BD)
    mask = (i < n)[:, None] & (d < D)[None, :]
    off = i.to(tl.int64)[:, None] * D + d[None, :]
    o = tl.load(o_ptr + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + i, row_sum(o * do, 1), mask=i < n)


# ------------------------------------------------------------------------------------------------ host side
class AttnPlan:
    """Row/tile tables and launch settings of one attention call (shared by forward and backward)."""

    def __init__(self, layout: DocLayout, heads: int, kv_heads: int, dim: int, dtype, block_size: int,
                 scale: float, dense_len: int):
        self.layout, self.heads, self.kv_heads, self.dim = layout, heads, kv_heads, dim
        self.group = heads // kv_heads
        self.block_size, self.scale, self.dense_len = block_size, scale, dense_len
        self.prec = dot_precision(dtype)
        self.bd = max(16, next_pow2(dim))
        big = not interpreting() and self.bd <= 128
        self.dense_bm = 128 if big else 64
        self.dense_tiles = layout.tiles(self.dense_bm, 0, dense_len)
        self.sparse_rows = layout.rows(dense_len)
        qhi = [min(p0 + n, dense_len) if p0 < dense_len else 0 for p0, n in zip(layout.qpos0, layout.qlen)]
        self.dense_ktiles = layout.key_tiles(64, qhi)
        self.doc_kstart, self.doc_qstart, self.doc_qpos0, self.doc_qhi = (
            layout.doc_tensor(x) for x in (layout.kstart, layout.qstart, layout.qpos0, qhi)
        )
        self.gather_rows = max(16, next_pow2(self.group))
        self.blocks_per_step = max(1, 64 // block_size)  # 64-key tiles (the interpreter takes a whole list)
        self.tokens_per_prog = 16 if interpreting() else 1  # more queries per program only to cut interpreter overhead
        self.dkdv_chunk = 4096 if interpreting() else DKDV_CHUNK

    @staticmethod
    def list_lengths(idx3: torch.Tensor) -> torch.Tensor:
        """Valid entries per list [HKV, R] int32 (lists hold their valid entries first)."""
        return (idx3 >= 0).sum(-1, dtype=torch.int32)

    def _blocks_per_step(self, k_slots: int) -> int:
        return next_pow2(k_slots) if interpreting() else self.blocks_per_step

    # forward ------------------------------------------------------------------------------------------
    def forward(self, q3, k3, v3, idx3):
        o = new_empty(q3.shape, q3.dtype, q3.device)
        lse = new_empty((q3.shape[0], self.heads), torch.float32, q3.device)
        scale_log2 = self.scale * LOG2E
        row0, nrows, _ = self.dense_tiles
        if row0.numel():
            _dense_fwd_kernel[(row0.numel(), self.heads)](
                q3, k3, v3, o, lse, row0, nrows, self.layout.row_pos, self.layout.row_kbase, row0.numel(),
                q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), o.stride(0), o.stride(1), lse.stride(0),
                scale_log2, G=self.group, D=self.dim, BD=self.bd, BM=self.dense_bm, BN=64, PREC=self.prec,
                num_warps=8 if self.dense_bm == 128 else 4, num_stages=3 if self.dense_bm == 128 else 2,
            )
        n_rows = self.sparse_rows.numel()
        if n_rows:
            counts = self.list_lengths(idx3)
            _gather_fwd_kernel[(triton.cdiv(n_rows, self.tokens_per_prog), self.kv_heads)](
                q3, k3, v3, o, lse, idx3, counts, self.sparse_rows, n_rows, self.layout.row_pos,
                self.layout.row_kbase,
                q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), o.stride(0), o.stride(1), lse.stride(0),
                idx3.stride(0), idx3.stride(1), counts.stride(0), scale_log2,
                G=self.group, M=self.gather_rows, TOK=self.tokens_per_prog, D=self.dim, BD=self.bd,
                BS=self.block_size, NBI=self._blocks_per_step(idx3.shape[-1]), PREC=self.prec,
                num_warps=4, num_stages=3,
            )
        return o, lse

    # backward -----------------------------------------------------------------------------------------
    def backward(self, do3, q3, k3, v3, o3, lse, idx3):
        rows_heads = q3.shape[0] * self.heads
        delta = torch.empty((q3.shape[0], self.heads), dtype=torch.float32, device=q3.device)
        _delta_kernel[(triton.cdiv(rows_heads, 64),)](o3, do3, delta, rows_heads, D=self.dim, BD=self.bd, BLOCK=64)
        dq = new_empty(q3.shape, q3.dtype, q3.device)
        dk = torch.zeros(k3.shape, dtype=torch.float32, device=k3.device)
        dv = torch.zeros(k3.shape, dtype=torch.float32, device=k3.device)
        self._dense_backward(do3, q3, k3, v3, lse, delta, dq, dk, dv)
        if self.sparse_rows.numel():
            self._sparse_backward(do3, q3, k3, v3, lse, delta, idx3, dq, dk, dv)
        return dq, dk.to(k3.dtype), dv.to(v3.dtype)

    def _dense_backward(self, do3, q3, k3, v3, lse, delta, dq, dk, dv):
        scale_log2 = self.scale * LOG2E
        row0, nrows, _ = self.dense_tiles
        if row0.numel() == 0:
            return
        _dense_dq_kernel[(row0.numel(), self.heads)](
            q3, k3, v3, do3, lse, delta, dq, row0, nrows, self.layout.row_pos, self.layout.row_kbase, row0.numel(),
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), scale_log2, self.scale,
            G=self.group, D=self.dim, BD=self.bd, BM=64, BN=64, PREC=self.prec, num_warps=4, num_stages=2,
        )
        kdoc, kstart = self.dense_ktiles
        nsplit = min(self.group, 4)
        _dense_dkdv_kernel[(kdoc.numel(), self.kv_heads, nsplit)](
            q3, k3, v3, do3, lse, delta, dk, dv, kdoc, kstart,
            self.doc_kstart, self.doc_qstart, self.doc_qpos0, self.doc_qhi,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
            scale_log2, self.scale,
            G=self.group, NSPLIT=nsplit, D=self.dim, BD=self.bd, BM=64, BN=64, PREC=self.prec,
            num_warps=4, num_stages=2,
        )

    def _sparse_backward(self, do3, q3, k3, v3, lse, delta, idx3, dq, dk, dv):
        scale_log2 = self.scale * LOG2E
        n_rows = self.sparse_rows.numel()
        counts = self.list_lengths(idx3)
        _gather_dq_kernel[(triton.cdiv(n_rows, self.tokens_per_prog), self.kv_heads)](
            q3, k3, v3, do3, lse, delta, dq, idx3, counts, self.sparse_rows, n_rows, self.layout.row_pos,
            self.layout.row_kbase,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), idx3.stride(0), idx3.stride(1),
            counts.stride(0), scale_log2, self.scale,
            G=self.group, M=self.gather_rows, TOK=self.tokens_per_prog, D=self.dim, BD=self.bd,
            BS=self.block_size, NBI=self._blocks_per_step(idx3.shape[-1]), PREC=self.prec, num_warps=4, num_stages=2,
        )
        chunks, entry_row, gb_krow0, gb_kend, num_gblocks = self.key_map(idx3)
        if chunks[0].numel() == 0:
            return
        group_pad = next_pow2(self.group)
        per_step = max(1, (256 if interpreting() else 64) // group_pad)
        _gather_dkdv_kernel[(chunks[0].numel(),)](
            q3, k3, v3, do3, lse, delta, dk, dv, *chunks, entry_row, gb_krow0, gb_kend,
            self.layout.row_pos, self.layout.row_kbase, num_gblocks,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
            scale_log2, self.scale,
            G=self.group, GP=group_pad, TP=per_step, D=self.dim, BD=self.bd, BS=self.block_size, PREC=self.prec,
            num_warps=4, num_stages=2,
        )

    def key_map(self, idx3):
        """Transposed block lists: (group, global block) -> the sparse rows that selected it, in chunks.

        Returns ((chunk key, first entry, end entry), entry_row, block first key row, block end key row,
        number of global blocks); chunk key = group · num_gblocks + global block.
        """
        layout, rows = self.layout, self.sparse_rows.long()
        base, gb_krow0, gb_kend = layout.global_blocks(self.block_size)
        num_gblocks = gb_krow0.numel()
        row_doc_base = torch.repeat_interleave(
            layout.doc_tensor(base), layout.doc_tensor(layout.qlen).long(), output_size=layout.num_rows
        )
        lists = idx3.index_select(1, rows)  # [HKV, NS, K]
        n_keys = self.kv_heads * num_gblocks
        key_dtype = torch.int32 if n_keys < 2**31 - 1 else torch.int64
        heads_off = (torch.arange(self.kv_heads, device=idx3.device) * num_gblocks)[:, None, None]
        keys = (lists + row_doc_base[rows][None, :, None] + heads_off).to(key_dtype)
        keys = torch.where(lists >= 0, keys, torch.full_like(keys, n_keys)).flatten()
        sorted_keys, order = torch.sort(keys)
        counts = torch.bincount(sorted_keys.long(), minlength=n_keys + 1)[:n_keys]
        n_entries = int(counts.sum())
        entry_row = rows[(order[:n_entries] // lists.shape[-1]) % rows.numel()].int()
        starts = torch.cumsum(counts, 0) - counts
        per_key = (counts + self.dkdv_chunk - 1) // self.dkdv_chunk
        n_chunks = int(per_key.sum())
        chunk_key = torch.repeat_interleave(torch.arange(n_keys, device=idx3.device), per_key, output_size=n_chunks)
        first_chunk = torch.cumsum(per_key, 0) - per_key
        within = torch.arange(n_chunks, device=idx3.device) - first_chunk[chunk_key]
        e0 = starts[chunk_key] + within * self.dkdv_chunk
        e1 = torch.minimum(e0 + self.dkdv_chunk, starts[chunk_key] + counts[chunk_key])
        chunks = (chunk_key.int(), e0.int(), e1.int())
        return chunks, entry_row, gb_krow0, gb_kend, num_gblocks


class SparseAttnFn(torch.autograd.Function):
    """o = attention(q, k, v) over dense rows and listed blocks; block lists are constants."""

    @staticmethod
    def forward(ctx, q, k, v, idx3, plan: AttnPlan):
        batch, seqlen_q, heads, dim = q.shape
        q3 = q.contiguous().view(batch * seqlen_q, heads, dim)
        k3 = k.contiguous().view(-1, k.shape[2], dim)
        v3 = v.contiguous().view(-1, v.shape[2], dim)
        o3, lse = plan.forward(q3, k3, v3, idx3)
        ctx.save_for_backward(q3, k3, v3, o3, lse, idx3)
        ctx.plan, ctx.shapes = plan, (q.shape, k.shape)
        return o3.view(q.shape)

    @staticmethod
    def backward(ctx, do):
        q3, k3, v3, o3, lse, idx3 = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        do3 = do.contiguous().view(q3.shape)
        dq, dk, dv = ctx.plan.backward(do3, q3, k3, v3, o3, lse, idx3)
        return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), None, None


def sort_block_lists(idx3: torch.Tensor) -> torch.Tensor:
    """Valid entries first in ascending order, -1 after: the layout the kernels walk."""
    big = torch.iinfo(torch.int32).max
    ordered = torch.sort(torch.where(idx3 < 0, big, idx3), dim=-1).values
    return torch.where(ordered == big, -1, ordered).int()


def infllmv2_block_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dense_len: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of every query over the blocks listed for its KV group; differentiable in q, k, v.

    block_idx [B, HKV, Tq, K] int32: distinct block indices of the query's document, any order, -1 for
    unused slots. Keys after the query are masked (causal inside the current block). Queries at position
    < dense_len ignore their list and attend to every key <= t.
    """
    from .score import resolve_backend

    check_qkv(q, k, v, cu_seqlens)
    batch, seqlen_q, heads, dim = q.shape
    kv_heads = k.shape[2]
    if block_idx.shape[:3] != (batch, kv_heads, seqlen_q):
        raise ValueError(f"block_idx {tuple(block_idx.shape)} must be [B, HKV, Tq, K] = [{batch}, {kv_heads}, {seqlen_q}, K]")
    if resolve_backend(backend, q) == "torch":
        return infllmv2_block_attn_naive(
            q, k, v, block_idx, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens, dense_len=dense_len
        )
    if block_size < 16 or block_size != next_pow2(block_size):
        raise ValueError(f"Triton block attention needs a power-of-two block_size >= 16, got {block_size}")
    scale = dim**-0.5 if scale is None else scale
    layout = DocLayout.build(q, k, cu_seqlens)
    idx3 = sort_block_lists(block_idx.permute(1, 0, 2, 3).reshape(kv_heads, batch * seqlen_q, -1))
    plan = AttnPlan(layout, heads, kv_heads, dim, q.dtype, block_size, scale, dense_len)
    return SparseAttnFn.apply(q, k, v, idx3, plan)
