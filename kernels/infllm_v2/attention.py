"""Stage (c): attention over given blocks, forward and backward, plus the dense path (t < dense_len).

Rows at position t < dense_len ("dense rows") attend to every key <= t; the rest ("sparse rows") attend to
the blocks listed for them in block_idx, causal inside the current block. Two kernel families share the work:

Local tile kernels (flash-attention style: BM consecutive queries of one head × BN keys, online softmax in the
exp2 domain, fp32 accumulators) handle each row's contiguous key range [lo(t), t]: dense rows lo = 0; with a
local window W (the fused op passes window_size), sparse rows lo = first block of positions t-W+1..t, so the
~33 window blocks that neighbouring queries share are read once per tile instead of once per query.
Backward: dq per query tile; dk/dv per key tile (128 keys x 32-query steps for 16-bit inputs, as Triton's
flash-attention backward), the G heads of a group split over NSPLIT programs that add into fp32 buffers with
atomics.

Gather kernels: one program per (query, KV group) holds the G heads of the group as the rows of an [M, D] tile
(M = G rounded up to a power of two, at least 16 for tl.dot) and walks the query's block list (only entries
before its local window when W > 0), loading each K/V block once for the whole group. For G < 16 the tile is
padded to 16 rows: the MMA does 16/G times the useful work, while memory traffic per (query, group) — the real
cost of gathered blocks — is unchanged. dq walks the same lists. dk/dv use the transposed map: the (group,
block, query) entries sorted by (group, block) with torch.sort and cut into chunks of at most DKDV_CHUNK
queries; a program loads its K/V block once, gathers TP queries × G heads of q/dO per step and adds dk/dv
into fp32 buffers with atomics (so the last bits of dk/dv may vary run to run).

With W > 0 a sparse row's softmax is split in two: the gather kernel writes its normalised partial output and
log-sum-exp (fp32, for one chunk of rows at a time: PART_BUDGET_BYTES), the local kernel starts its online
softmax from them and writes the final row. The backward needs no merge beyond dq: with the final lse and
delta = rowsum(dO·O), the two key sets contribute independently (dq partials merged the same way as o).

Softmax statistics are kept as log2-sum-exp2 of scale·q·k·log2(e) ("lse2", fp32 [R, HQ]); a row without
any visible key outputs 0 and gets lse2 = +inf (zero gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

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
    should_tune,
    Tunable,
)
from .naive import infllmv2_block_attn_naive

__all__ = ["infllmv2_block_attn", "AttnPlan", "SparseAttnFn", "sort_block_lists"]

DKDV_CHUNK = 256  # queries per dk/dv program of one block (bounds the work of heavily selected blocks)
INTERPRETER_TOKENS = 16  # queries per gather program under the interpreter (1 reproduces the GPU code path)
PART_BUDGET_BYTES = 512 * 2**20  # fp32 partial outputs of one row chunk (window split)


# ---------------------------------------------------------------------------------------------- local tiles
@triton.jit
def _local_start(t, dense_len, BS: tl.constexpr, WIN: tl.constexpr):
    """First key of a row's local range: 0 for dense rows; for sparse rows the first block of the window
    (WIN > 0) or t + 1, i.e. nothing (WIN = 0)."""
    if WIN > 0:
        sparse_lo = (tl.maximum(t - WIN + 1, 0) // BS) * BS
    else:
        sparse_lo = t + 1
    return tl.where(t < dense_len, 0, sparse_lo)


@triton.jit
def _fwd_step(q, k_ptr, v_ptr, kv_base, j0, t, lo, t_last, m_i, l_i, acc, d, dm, scale_log2,
              stride_kr, BN: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    kp = j0 + tl.arange(0, BN)
    kv_off = kv_base + kp.to(tl.int64) * stride_kr
    if MASKED:
        ld_mask = (kp <= t_last)[:, None] & dm[None, :]
    else:
        ld_mask = dm[None, :]
    kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
    if MASKED:
        s = tl.where((kp[None, :] <= t[:, None]) & (kp[None, :] >= lo[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, row_max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + row_sum(p, 1)
    vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _local_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr,
    n_tiles, part_row_base, dense_len,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_or, stride_oh, stride_lr, stride_pr, stride_ph, stride_plr,
    scale_log2,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    WIN: tl.constexpr, HAS_PART: tl.constexpr, PREC: tl.constexpr,
):
    tile = n_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(tile_row0_ptr + tile)
    nrows = tl.load(tile_nrows_ptr + tile)
    pos0 = tl.load(row_pos_ptr + row0)
    kv_base = tl.load(row_kbase_ptr + row0).to(tl.int64) * stride_kr + (h // G) * stride_kh
    t_last = pos0 + nrows - 1
    i = tl.arange(0, BM)
    r_ok = i < nrows
    t = pos0 + i
    lo = _local_start(t, dense_len, BS, WIN)
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
    k_lo = (_local_start(pos0, dense_len, BS, WIN) // BN) * BN
    u0 = tl.maximum(((_local_start(t_last, dense_len, BS, WIN) + BN - 1) // BN) * BN, k_lo)
    u1 = tl.maximum((pos0 // BN) * BN, u0)  # [u0, u1): inside every row's range, no mask
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
    kp = j0 + tl.arange(0, BN)
    kv_off = kv_base + kp.to(tl.int64) * stride_kr
    if MASKED:
        ld_mask = (kp <= t_last)[:, None] & dm[None, :]
    else:
        ld_mask = dm[None, :]
    kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where((kp[None, :] <= t[:, None]) & (kp[None, :] >= lo[:, None]), p, 0.0)
    dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)


@triton.jit
def _local_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, part_ptr,
    tile_row0_ptr, tile_nrows_ptr, row_pos_ptr, row_kbase_ptr,
    n_tiles, part_row_base, dense_len,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_pr, stride_ph,
    scale_log2, scale,
    G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr,
    WIN: tl.constexpr, HAS_PART: tl.constexpr, PREC: tl.constexpr,
):
    tile = n_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(tile_row0_ptr + tile)
    nrows = tl.load(tile_nrows_ptr + tile)
    pos0 = tl.load(row_pos_ptr + row0)
    kv_base = tl.load(row_kbase_ptr + row0).to(tl.int64) * stride_kr + (h // G) * stride_kh
    t_last = pos0 + nrows - 1
    i = tl.arange(0, BM)
    r_ok = i < nrows
    t = pos0 + i
    lo = _local_start(t, dense_len, BS, WIN)
    d = tl.arange(0, BD)
    dm = d < D
    rows = (row0 + i).to(tl.int64)
    qd_off = (rows * stride_qr + h * stride_qh)[:, None] + d[None, :]
    qd_mask = r_ok[:, None] & dm[None, :]
    q = tl.load(q_ptr + qd_off, mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + qd_off, mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + rows * stride_lr + h, mask=r_ok, other=float("inf"))
    delta = tl.load(delta_ptr + rows * stride_lr + h, mask=r_ok, other=0.0)
    dq = tl.full([BM, BD], 0.0, tl.float32)
    k_lo = (_local_start(pos0, dense_len, BS, WIN) // BN) * BN
    u0 = tl.maximum(((_local_start(t_last, dense_len, BS, WIN) + BN - 1) // BN) * BN, k_lo)
    u1 = tl.maximum((pos0 // BN) * BN, u0)
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
    dense_len,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_dkr, stride_dkh,
    scale_log2, scale,
    G: tl.constexpr, NSPLIT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BS: tl.constexpr, WIN: tl.constexpr, PREC: tl.constexpr,
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
    kp = j0 + tl.arange(0, BN)
    k_ok = kp < length
    j_last = tl.minimum(j0 + BN, length) - 1
    q_hi = tl.minimum(qend, dense_len)  # dense queries, then the sparse ones whose window reaches this tile
    if WIN > 0:
        q_hi = tl.minimum(qend, tl.maximum(q_hi, (j_last // BS + 1) * BS + WIN - 1))
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
        for p0 in range(p_start, q_hi, BM):
            tq = p0 + im
            q_ok = tq < q_hi
            lo = _local_start(tq, dense_len, BS, WIN)
            rows = (qstart + tq - qpos0).to(tl.int64)
            qd_off = (rows * stride_qr + h * stride_qh)[:, None] + d[None, :]
            q = tl.load(q_ptr + qd_off, mask=q_ok[:, None] & dm[None, :], other=0.0)
            do = tl.load(do_ptr + qd_off, mask=q_ok[:, None] & dm[None, :], other=0.0)
            lse = tl.load(lse_ptr + rows * stride_lr + h, mask=q_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows * stride_lr + h, mask=q_ok, other=0.0)
            s_t = tl.dot(kt, tl.trans(q), input_precision=PREC) * scale_log2  # [BN, BM]
            vis = (kp[:, None] <= tq[None, :]) & (kp[:, None] >= lo[None, :]) & k_ok[:, None] & q_ok[None, :]
            p_t = tl.where(vis, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
            dp_t = tl.dot(vt, tl.trans(do), input_precision=PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    out_off = (kstart + kp).to(tl.int64)[:, None] * stride_dkr + hk * stride_dkh + d[None, :]
    out_mask = k_ok[:, None] & dm[None, :]
    tl.atomic_add(dk_ptr + out_off, dk * scale, mask=out_mask)
    tl.atomic_add(dv_ptr + out_off, dv, mask=out_mask)


@triton.jit
def _gathered_keys(idx_k, s0, n_k, t_k, jj, BS: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Key positions of list entries s0.. of a gather step (jj = 0..NBI·BS·TOK-1) and which are visible."""
    if ONE_BLOCK:  # one block per step: a scalar block index
        blk = tl.load(idx_k + s0)
        kp = blk * BS + jj
        k_ok = kp <= t_k
    else:
        slot = s0 + jj // BS
        s_ok = slot < n_k
        blk = tl.load(idx_k + slot, mask=s_ok, other=0)
        kp = blk * BS + jj % BS
        k_ok = s_ok & (kp <= t_k)
    return kp, k_ok


# ---------------------------------------------------------------------------------------------- sparse rows
@triton.jit
def _gather_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, count_ptr,
    rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, out_row_base,
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
    if TOK == 1:  # one query per program (GPU): its row data are scalars, addresses stay simple
        r_k = tl.load(rows_ptr + tl.program_id(0))
        n_k = tl.load(count_ptr + hk * stride_ch + r_k)
        n_max = n_k
    else:  # several queries per program (interpreter): per key-lane copies of each query's row data
        r_k = tl.load(rows_ptr + tl.program_id(0) * TOK + tok_k, mask=tl.program_id(0) * TOK + tok_k < n_rows, other=0)
        n_k = tl.load(count_ptr + hk * stride_ch + r_k, mask=tl.program_id(0) * TOK + tok_k < n_rows, other=0)
        n_max = row_max(n_k, 0)
    t_k = tl.load(row_pos_ptr + r_k)
    kv_base = tl.load(row_kbase_ptr + r_k).to(tl.int64) * stride_kr + hk * stride_kh
    idx_k = idx_ptr + hk * stride_ih + r_k.to(tl.int64) * stride_ir
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + (r_m * stride_qr + heads * stride_qh)[:, None] + d[None, :],
                mask=row_m_ok[:, None] & dm[None, :], other=0.0)
    same_tok = tok_m[:, None] == tok_k[None, :]
    m_i = tl.full([TOK * M], float("-inf"), tl.float32)
    l_i = tl.full([TOK * M], 0.0, tl.float32)
    acc = tl.full([TOK * M, BD], 0.0, tl.float32)
    for s0 in range(0, n_max, NBI):
        kp, k_ok = _gathered_keys(idx_k, s0, n_k, t_k, jj, BS, NBI * TOK == 1)
        kv_off = kv_base + kp.to(tl.int64) * stride_kr
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
    r_out = r_m - out_row_base
    tl.store(o_ptr + (r_out * stride_or + heads * stride_oh)[:, None] + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_m_ok[:, None] & dm[None, :])
    tl.store(lse_ptr + r_out * stride_lr + heads, tl.where(l_ok, m_i + tl.log2(l_div), float("inf")),
             mask=row_m_ok)


@triton.jit
def _gather_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, count_ptr,
    rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, out_row_base,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_ih, stride_ir, stride_ch, stride_dqr, stride_dqh,
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
    if TOK == 1:  # one query per program (GPU): its row data are scalars, addresses stay simple
        r_k = tl.load(rows_ptr + tl.program_id(0))
        n_k = tl.load(count_ptr + hk * stride_ch + r_k)
        n_max = n_k
    else:  # several queries per program (interpreter): per key-lane copies of each query's row data
        r_k = tl.load(rows_ptr + tl.program_id(0) * TOK + tok_k, mask=tl.program_id(0) * TOK + tok_k < n_rows, other=0)
        n_k = tl.load(count_ptr + hk * stride_ch + r_k, mask=tl.program_id(0) * TOK + tok_k < n_rows, other=0)
        n_max = row_max(n_k, 0)
    t_k = tl.load(row_pos_ptr + r_k)
    kv_base = tl.load(row_kbase_ptr + r_k).to(tl.int64) * stride_kr + hk * stride_kh
    idx_k = idx_ptr + hk * stride_ih + r_k.to(tl.int64) * stride_ir
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
        kp, k_ok = _gathered_keys(idx_k, s0, n_k, t_k, jj, BS, NBI * TOK == 1)
        kv_off = kv_base + kp.to(tl.int64) * stride_kr
        kt = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        vt = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=k_ok[:, None] & dm[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        p = tl.where(same_tok & k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    dq_off = ((r_m - out_row_base) * stride_dqr + heads * stride_dqh)[:, None] + d[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


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
_local_fwd = Tunable(_local_fwd_kernel, [(8, 3), (8, 2)], key=["G", "D", "BM", "WIN", "HAS_PART"])
_gather_fwd = Tunable(_gather_fwd_kernel, [(4, 3), (4, 2), (8, 3)], key=["G", "D", "BS", "NBI"])
_gather_dq = Tunable(_gather_dq_kernel, [(4, 2), (4, 3), (8, 2)], key=["G", "D", "BS", "NBI"])


@dataclass
class RowChunk:
    """Rows [lo, hi): local tiles (first row, rows, doc) for the forward and for dq (their own tile height),
    and the sparse rows gathered, latest first."""

    lo: int
    hi: int
    tiles: tuple
    sparse_rows: torch.Tensor
    dq_tiles: tuple


class AttnPlan:
    """Row/tile tables and launch settings of one attention call (shared by forward and backward).

    local_window > 0 moves each sparse row's window blocks to the local tile kernels; it is exact only when
    the visible set always contains the whole window (the caller checks; see `window_split_exact`).
    """

    def __init__(self, layout: DocLayout, heads: int, kv_heads: int, dim: int, dtype, block_size: int,
                 scale: float, dense_len: int, local_window: int = 0, part_budget_bytes: int | None = None):
        self.layout, self.heads, self.kv_heads, self.dim = layout, heads, kv_heads, dim
        self.group = heads // kv_heads
        self.block_size, self.scale, self.dense_len = block_size, scale, dense_len
        self.prec = dot_precision(dtype)
        self.bd = max(16, next_pow2(dim))
        # tile sizes: 16-bit inputs use tensor-core tiles; fp32 ("ieee" FMA dots, tests only) small ones that
        # keep shared memory far below the limit; the interpreter takes big tiles (fewer steps)
        small = self.prec == "ieee" and not interpreting()
        self.tile_m = 64 if interpreting() or small or self.bd > 128 else 128
        self.local_bn = 32 if small else 64
        # dq takes its own (smaller) tiles; the interpreter uses a height unlike tile_m so CPU tests cover that
        self.dq_tile_m = 32 if small or interpreting() else 64
        self.fwd_config = (8, 2) if small else ((8, 3) if self.tile_m == 128 else (4, 2))
        self.gather_rows = max(16, next_pow2(self.group))
        self.blocks_per_step = max(1, 64 // block_size)  # 64-key tiles (the interpreter takes a whole list)
        self.tokens_per_prog = INTERPRETER_TOKENS if interpreting() else 1  # >1 only to cut interpreter overhead
        self.dkdv_chunk = 4096 if interpreting() else DKDV_CHUNK
        # gathered dk/dv: query rows (TP queries x G heads, padded) per step; local dk/dv: programs per group
        self.dkdv_rows = 256 if interpreting() else (32 if self.prec == "ieee" else 64)
        self.dkdv_nsplit = min(self.group, 4)
        # local dk/dv: key tile x query step (Triton's flash-attention backward uses 128 keys x 32 queries; the
        # fp32 test path keeps small tiles for shared memory, head dims > 128 keep 64 keys for registers)
        wide_keys = not small and self.bd <= 128
        self.dkdv_bn, self.dkdv_bm = (128, 32) if wide_keys else (self.local_bn, self.dq_tile_m)
        has_sparse = any(p0 + n > dense_len for p0, n in zip(layout.qpos0, layout.qlen))
        self.window = local_window if has_sparse else 0
        rows = layout.num_rows
        if self.window:
            budget = PART_BUDGET_BYTES if part_budget_bytes is None else part_budget_bytes
            per_chunk = max(self.tile_m, budget // (4 * heads * (dim + 1)))
            bounds = [(lo, min(lo + per_chunk, rows)) for lo in range(0, rows, per_chunk)]
            local_pos_hi = 2**62
        else:
            bounds, local_pos_hi = [(0, rows)], dense_len
        self.chunks = [
            RowChunk(lo, hi, layout.tiles(self.tile_m, 0, local_pos_hi, lo, hi), layout.rows(dense_len, 2**62, lo, hi),
                     layout.tiles(self.dq_tile_m, 0, local_pos_hi, lo, hi))
            for lo, hi in bounds
        ]
        qend = [p0 + n for p0, n in zip(layout.qpos0, layout.qlen)]
        self.key_hi = [n if self.window else min(e, dense_len) for n, e in zip(layout.length, qend)]
        self.docs = [layout.doc_tensor(x) for x in (layout.kstart, layout.length, layout.qstart, layout.qpos0, qend)]

    def list_lengths(self, idx3: torch.Tensor) -> torch.Tensor:
        """Entries of each list the gather kernels take [HKV, R] int32: the valid ones (listed first),
        before the local window when there is one."""
        valid = idx3 >= 0
        if self.window:
            first_local = torch.clamp(self.layout.row_pos.long() - self.window + 1, min=0) // self.block_size
            valid &= idx3 < first_local[None, :, None]
        return valid.sum(-1, dtype=torch.int32)

    def _blocks_per_step(self, k_slots: int) -> int:
        return next_pow2(k_slots) if interpreting() and self.tokens_per_prog > 1 else self.blocks_per_step

    def _gather_meta(self, k_slots):
        return dict(G=self.group, M=self.gather_rows, TOK=self.tokens_per_prog, D=self.dim, BD=self.bd,
                    BS=self.block_size, NBI=self._blocks_per_step(k_slots), PREC=self.prec)

    def _local_meta(self, tile_m=None):
        return dict(G=self.group, D=self.dim, BD=self.bd, BM=tile_m or self.tile_m, BN=self.local_bn,
                    BS=self.block_size, WIN=self.window, PREC=self.prec)

    # forward ------------------------------------------------------------------------------------------
    def forward(self, q3, k3, v3, idx3):
        rows = q3.shape[0]
        o = new_empty(q3.shape, q3.dtype, q3.device)
        lse = new_empty((rows, self.heads), torch.float32, q3.device)
        counts = self.list_lengths(idx3)
        scale_log2 = self.scale * LOG2E
        tune = should_tune(q3, self.group)
        for ch in self.chunks:
            part_o, part_lse, base = o, lse, 0
            n_sparse = ch.sparse_rows.numel()
            if n_sparse and self.window:
                part_o = new_empty((ch.hi - ch.lo, self.heads, self.dim), torch.float32, q3.device)
                part_lse = new_empty((ch.hi - ch.lo, self.heads), torch.float32, q3.device)
                base = ch.lo
            if n_sparse:
                _gather_fwd.launch(
                    (triton.cdiv(n_sparse, self.tokens_per_prog), self.kv_heads), tune,
                    q3, k3, v3, part_o, part_lse, idx3, counts, ch.sparse_rows, n_sparse, self.layout.row_pos,
                    self.layout.row_kbase, base,
                    q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), part_o.stride(0), part_o.stride(1),
                    part_lse.stride(0), idx3.stride(0), idx3.stride(1), counts.stride(0), scale_log2,
                    **self._gather_meta(idx3.shape[-1]),
                )
            row0, nrows, _ = ch.tiles
            if row0.numel():
                has_part = bool(n_sparse and self.window)
                _local_fwd.launch(
                    (row0.numel(), self.heads), tune and self.tile_m == 128,
                    q3, k3, v3, o, lse, part_o, part_lse, row0, nrows, self.layout.row_pos, self.layout.row_kbase,
                    row0.numel(), base, self.dense_len,
                    q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), o.stride(0), o.stride(1), lse.stride(0),
                    part_o.stride(0), part_o.stride(1), part_lse.stride(0), scale_log2,
                    **self._local_meta(), HAS_PART=has_part, default=self.fwd_config,
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
        counts = self.list_lengths(idx3)
        scale_log2 = self.scale * LOG2E
        wide = self.bd >= 128
        tune = should_tune(q3, self.group)
        for ch in self.chunks:
            part, base = dq, 0
            n_sparse = ch.sparse_rows.numel()
            if n_sparse and self.window:
                part, base = new_empty((ch.hi - ch.lo, self.heads, self.dim), torch.float32, q3.device), ch.lo
            if n_sparse:
                _gather_dq.launch(
                    (triton.cdiv(n_sparse, self.tokens_per_prog), self.kv_heads), tune,
                    q3, k3, v3, do3, lse, delta, part, idx3, counts, ch.sparse_rows, n_sparse,
                    self.layout.row_pos, self.layout.row_kbase, base,
                    q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), idx3.stride(0),
                    idx3.stride(1), counts.stride(0), part.stride(0), part.stride(1), scale_log2, self.scale,
                    **self._gather_meta(idx3.shape[-1]),
                )
            row0, nrows, _ = ch.dq_tiles  # tiles of dq_tile_m rows: the kernel's BM must cover each tile
            if row0.numel():
                _local_dq_kernel[(row0.numel(), self.heads)](
                    q3, k3, v3, do3, lse, delta, dq, part, row0, nrows, self.layout.row_pos, self.layout.row_kbase,
                    row0.numel(), base, self.dense_len,
                    q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), part.stride(0),
                    part.stride(1), scale_log2, self.scale,
                    **self._local_meta(self.dq_tile_m), HAS_PART=bool(n_sparse and self.window),
                    num_warps=4, num_stages=2,
                )
        kdoc, kstart = self.layout.key_tiles(self.dkdv_bn, self.key_hi)
        if kdoc.numel():
            nsplit = self.dkdv_nsplit
            _local_dkdv_kernel[(kdoc.numel(), self.kv_heads, nsplit)](
                q3, k3, v3, do3, lse, delta, dk, dv, kdoc, kstart, *self.docs, self.dense_len,
                q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
                scale_log2, self.scale, **dict(self._local_meta(self.dkdv_bm), BN=self.dkdv_bn), NSPLIT=nsplit,
                num_warps=8 if wide else 4, num_stages=2,
            )
        if any(ch.sparse_rows.numel() for ch in self.chunks):
            self._gather_dkdv(do3, q3, k3, v3, lse, delta, idx3, counts, dk, dv, 8 if wide else 4)
        return dq, dk.to(k3.dtype), dv.to(v3.dtype)

    def _gather_dkdv(self, do3, q3, k3, v3, lse, delta, idx3, counts, dk, dv, num_warps):
        chunks, entry_row, gb_krow0, gb_kend, num_gblocks = self.key_map(idx3, counts)
        if chunks[0].numel() == 0:
            return
        group_pad = next_pow2(self.group)
        per_step = max(1, self.dkdv_rows // group_pad)
        _gather_dkdv_kernel[(chunks[0].numel(),)](
            q3, k3, v3, do3, lse, delta, dk, dv, *chunks, entry_row, gb_krow0, gb_kend,
            self.layout.row_pos, self.layout.row_kbase, num_gblocks,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
            self.scale * LOG2E, self.scale,
            G=self.group, GP=group_pad, TP=per_step, D=self.dim, BD=self.bd, BS=self.block_size, PREC=self.prec,
            num_warps=num_warps, num_stages=2,
        )

    def key_map(self, idx3, counts):
        """Transposed block lists: (group, global block) -> the sparse rows that selected it, in chunks.

        Only the entries the gather kernels take (the first `counts` of each list). Returns ((chunk key, first
        entry, end entry), entry_row, block first key row, block end key row, number of global blocks);
        chunk key = group · num_gblocks + global block.
        """
        layout = self.layout
        rows = torch.cat([ch.sparse_rows for ch in self.chunks]).long()
        base, gb_krow0, gb_kend = layout.global_blocks(self.block_size)
        num_gblocks = gb_krow0.numel()
        row_doc_base = torch.repeat_interleave(
            layout.doc_tensor(base), layout.doc_tensor(layout.qlen).long(), output_size=layout.num_rows
        )
        lists = idx3.index_select(1, rows)  # [HKV, NS, K]
        taken = torch.arange(lists.shape[-1], device=idx3.device) < counts.index_select(1, rows)[..., None]
        n_keys = self.kv_heads * num_gblocks
        key_dtype = torch.int32 if n_keys < 2**31 - 1 else torch.int64
        heads_off = (torch.arange(self.kv_heads, device=idx3.device) * num_gblocks)[:, None, None]
        keys = (lists + row_doc_base[rows][None, :, None] + heads_off).to(key_dtype)
        keys = torch.where(taken, keys, torch.full_like(keys, n_keys)).flatten()
        sorted_keys, order = torch.sort(keys)
        counts_per_key = torch.bincount(sorted_keys.long(), minlength=n_keys + 1)[:n_keys]
        n_entries = int(counts_per_key.sum())
        entry_row = rows[(order[:n_entries] // lists.shape[-1]) % rows.numel()].int()
        starts = torch.cumsum(counts_per_key, 0) - counts_per_key
        per_key = (counts_per_key + self.dkdv_chunk - 1) // self.dkdv_chunk
        n_chunks = int(per_key.sum())
        chunk_key = torch.repeat_interleave(torch.arange(n_keys, device=idx3.device), per_key, output_size=n_chunks)
        first_chunk = torch.cumsum(per_key, 0) - per_key
        within = torch.arange(n_chunks, device=idx3.device) - first_chunk[chunk_key]
        e0 = starts[chunk_key] + within * self.dkdv_chunk
        e1 = torch.minimum(e0 + self.dkdv_chunk, starts[chunk_key] + counts_per_key[chunk_key])
        chunks = (chunk_key.int(), e0.int(), e1.int())
        return chunks, entry_row, gb_krow0, gb_kend, num_gblocks


def window_split_exact(init_blocks: int, topk: int, window_size: int, block_size: int) -> bool:
    """The window's blocks (at most (W-1)//B_s + 2) plus the init blocks always fit in K: every visible set
    contains the whole local window, so it can be computed by the local tile kernels."""
    num_selected = topk + window_size // block_size
    return window_size > 0 and init_blocks + (window_size - 1) // block_size + 2 <= num_selected


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
        raise ValueError(f"block_idx {tuple(block_idx.shape)} must be [B, HKV, Tq, K] = "
                         f"[{batch}, {kv_heads}, {seqlen_q}, K]")
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
