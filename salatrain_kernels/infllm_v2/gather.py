"""Gather kernels of stage (c): the listed blocks of each sparse query row, forward, dq and dk/dv.

One program per (query, KV group) holds the G heads of the group as the rows of an [M, D] tile (M = G rounded
up to a power of two, at least 16 for tl.dot) and walks the query's block list (only the entries before its
local window when the window goes to the local tile kernels), loading each K/V block once for the whole
group. For G < 16 the tile is padded to 16 rows: the MMA does 16/G times the useful work, while memory traffic
per (query, group) — the real cost of gathered blocks — is unchanged. Under the interpreter a program takes
TOK queries at once (block-diagonal tiles) to cut interpreter overhead; TOK = 1 is the GPU code path.

dq walks the same lists. dk/dv use the transposed map (``AttnPlan.key_map``): the (group, block, query)
entries sorted by (group, block) and cut into chunks (their number stays on the device: programs past it return
at once); a program loads its K/V block (or BK of its keys: BS / BK neighbouring programs per chunk) once, gathers
TP queries × G heads of q/dO per step and adds dk/dv into fp32 buffers with atomics (so the last bits of dk/dv may
vary run to run). PREFETCH loads a step's rows into registers during the step before, the loop's pipeliner off
(Triton's pipeliner issues step i + 1's gathers after step i's matmuls and waits for them at once, so each step
paid a whole gather latency; plan.py chooses where prefetching is on). With DQ the same program also adds each
query's dq part from its block, dS·K, into an fp32 dq buffer with atomics (dq_mode="atomic"): one pass over the
(query, block) entries instead of two, at the price of run-to-run rounding in dq too and an fp32 dq buffer of all
rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..utils import Tunable, row_max
from .attn_steps import (
    backward_rows, dkdv_update, dq_update, key_rows, kv_tile, online_softmax, store_dkdv,
)


@triton.jit
def _query_rows(rows_ptr, n_rows, hk, G: tl.constexpr, M: tl.constexpr, TOK: tl.constexpr):
    """The tile's rows (TOK queries × M head slots): query of each row, head, validity and query row (int64)."""
    mm = tl.arange(0, TOK * M)
    tok_m = mm // M
    g = mm % M
    heads = hk * G + g
    row_m_ok = (tl.program_id(0) * TOK + tok_m < n_rows) & (g < G)
    r_m = tl.load(rows_ptr + tl.program_id(0) * TOK + tok_m, mask=row_m_ok, other=0).to(tl.int64)
    return tok_m, heads, row_m_ok, r_m


@triton.jit
def _key_lanes(rows_ptr, n_rows, count_ptr, row_pos_ptr, row_kbase_ptr, idx_ptr, hk,
               stride_kr, stride_kh, stride_ih, stride_ir, stride_ch, TOK: tl.constexpr, BN: tl.constexpr):
    """Per key lane of a step (TOK × BN): its query, offset jj in the step, and that query's position t_k, list
    length n_k, first key row of its document (kbase) and first K/V element, and block list; n_max = the longest
    list of the program."""
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
    kbase = tl.load(row_kbase_ptr + r_k)
    kv_base = kbase.to(tl.int64) * stride_kr + hk * stride_kh
    idx_k = idx_ptr + hk * stride_ih + r_k.to(tl.int64) * stride_ir
    return tok_k, jj, n_k, n_max, t_k, kbase, kv_base, idx_k


@triton.jit
def _gathered_keys(idx_k, s0, n_k, t_k, jj, BS: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """Key positions of list entries s0.. of a gather step (jj = 0..NBI·BS·TOK-1), which are visible, and the
    step's first key position (the block's, with ONE_BLOCK: where a tensor-descriptor load starts)."""
    if ONE_BLOCK:  # one block per step: a scalar block index
        blk = tl.load(idx_k + s0)
        kp = blk * BS + jj
        k_ok = kp <= t_k
        kp0 = blk * BS
    else:
        slot = s0 + jj // BS
        s_ok = slot < n_k
        blk = tl.load(idx_k + slot, mask=s_ok, other=0)
        kp = blk * BS + jj % BS
        k_ok = s_ok & (kp <= t_k)
        kp0 = 0
    return kp, k_ok, kp0


@triton.jit
def _gather_fwd_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, lse_ptr, idx_ptr, count_ptr,
    rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, out_row_base,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_or, stride_oh, stride_lr, stride_ih, stride_ir, stride_ch,
    scale_log2,
    G: tl.constexpr, M: tl.constexpr, TOK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    NBI: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr, FULL: tl.constexpr,
):
    # rows of the tile: TOK queries x M head slots; keys: TOK x (NBI blocks of BS keys), block-diagonal
    BN: tl.constexpr = NBI * BS
    hk = tl.program_id(1)
    tok_m, heads, row_m_ok, r_m = _query_rows(rows_ptr, n_rows, hk, G, M, TOK)
    tok_k, jj, n_k, n_max, t_k, kbase, kv_base, idx_k = _key_lanes(
        rows_ptr, n_rows, count_ptr, row_pos_ptr, row_kbase_ptr, idx_ptr, hk,
        stride_kr, stride_kh, stride_ih, stride_ir, stride_ch, TOK, BN)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + (r_m * stride_qr + heads * stride_qh)[:, None] + d[None, :],
                mask=row_m_ok[:, None] & dm[None, :], other=0.0)
    same_tok = tok_m[:, None] == tok_k[None, :]
    m_i = tl.full([TOK * M], float("-inf"), tl.float32)
    l_i = tl.full([TOK * M], 0.0, tl.float32)
    acc = tl.full([TOK * M, BD], 0.0, tl.float32)
    for s0 in range(0, n_max, NBI):
        kp, k_ok, kp0 = _gathered_keys(idx_k, s0, n_k, t_k, jj, BS, NBI * TOK == 1)
        kv_off = kv_base + kp.to(tl.int64) * stride_kr
        kt = key_rows(k_ptr, k_desc, kv_off, k_ok, kbase + kp0, hk, d, dm, BS, BD, DESC, FULL)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        s = tl.where(same_tok & k_ok[None, :], s, float("-inf"))
        m_i, alpha, p, l_i = online_softmax(s, m_i, l_i)
        vt = key_rows(v_ptr, v_desc, kv_off, k_ok, kbase + kp0, hk, d, dm, BS, BD, DESC, FULL)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
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
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, count_ptr,
    rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, out_row_base,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_ih, stride_ir, stride_ch, stride_dqr, stride_dqh,
    scale_log2, scale,
    G: tl.constexpr, M: tl.constexpr, TOK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    NBI: tl.constexpr, PREC: tl.constexpr, DESC: tl.constexpr, FULL: tl.constexpr,
):
    BN: tl.constexpr = NBI * BS
    hk = tl.program_id(1)
    tok_m, heads, row_m_ok, r_m = _query_rows(rows_ptr, n_rows, hk, G, M, TOK)
    tok_k, jj, n_k, n_max, t_k, kbase, kv_base, idx_k = _key_lanes(
        rows_ptr, n_rows, count_ptr, row_pos_ptr, row_kbase_ptr, idx_ptr, hk,
        stride_kr, stride_kh, stride_ih, stride_ir, stride_ch, TOK, BN)
    d = tl.arange(0, BD)
    dm = d < D
    qd_off, qd_mask, q, do, lse, delta = backward_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, r_m, heads, row_m_ok, d, dm,
                                                       stride_qr, stride_qh, stride_lr)
    same_tok = tok_m[:, None] == tok_k[None, :]
    dq = tl.full([TOK * M, BD], 0.0, tl.float32)
    for s0 in range(0, n_max, NBI):
        kp, k_ok, kp0 = _gathered_keys(idx_k, s0, n_k, t_k, jj, BS, NBI * TOK == 1)
        kv_off = kv_base + kp.to(tl.int64) * stride_kr
        kt = key_rows(k_ptr, k_desc, kv_off, k_ok, kbase + kp0, hk, d, dm, BS, BD, DESC, FULL)
        vt = key_rows(v_ptr, v_desc, kv_off, k_ok, kbase + kp0, hk, d, dm, BS, BD, DESC, FULL)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        p = tl.where(same_tok & k_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dq = dq_update(dq, p, do, kt, vt, delta, PREC)
    dq_off = ((r_m - out_row_base) * stride_dqr + heads * stride_dqh)[:, None] + d[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, row_kbase_ptr, row_pos_ptr, r, heads, ok, d, dm,
               stride_qr, stride_qh, stride_lr):
    """A gathered dk/dv step's query rows r (masked by ok): their key row (causal bound), q, dO, lse2, delta."""
    q_krow = tl.load(row_kbase_ptr + r, mask=ok, other=0) + tl.load(row_pos_ptr + r, mask=ok, other=0)
    _, _, q, do, lse, delta = backward_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, r.to(tl.int64), heads, ok, d, dm,
                                            stride_qr, stride_qh, stride_lr)
    return q_krow, q, do, lse, delta


@triton.jit
def _dkdv_step(dk, dv, kt, vt, krow, k_ok, q_krow, q, do, lse, delta, r, e_ok, heads, d, dm, dq_ptr,
               stride_dqr, stride_dqh, scale_log2, scale, PREC: tl.constexpr, DQ: tl.constexpr):
    """One step of a gathered dk/dv program: the block's dk/dv from the step's query rows; with DQ also the rows'
    dq part from this block, dS·K (times scale), added into the fp32 dq buffer."""
    s_t = tl.dot(kt, tl.trans(q), input_precision=PREC) * scale_log2  # [BK, M]
    vis = (krow[:, None] <= q_krow[None, :]) & k_ok[:, None] & e_ok[None, :]
    dk, dv, ds_t = dkdv_update(dk, dv, s_t, vis, q, do, vt, lse, delta, PREC)
    if DQ:
        dq = tl.dot(tl.trans(ds_t), kt, input_precision=PREC) * scale  # [M, BD]
        dq_off = (r.to(tl.int64) * stride_dqr + heads * stride_dqh)[:, None] + d[None, :]
        tl.atomic_add(dq_ptr + dq_off, dq, mask=e_ok[:, None] & dm[None, :])
    return dk, dv


@triton.jit
def _gather_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
    chunk_key_ptr, chunk_e0_ptr, chunk_e1_ptr, n_chunks_ptr, entry_row_ptr, gb_krow0_ptr, gb_kend_ptr,
    row_pos_ptr, row_kbase_ptr,
    num_gblocks,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_dkr, stride_dkh, stride_dqr, stride_dqh,
    scale_log2, scale,
    G: tl.constexpr, GP: tl.constexpr, TP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    BK: tl.constexpr, PREC: tl.constexpr, DQ: tl.constexpr, ATOMIC: tl.constexpr, PREFETCH: tl.constexpr,
):
    M: tl.constexpr = TP * GP
    NK: tl.constexpr = BS // BK  # programs per chunk, each with BK of the block's keys (neighbours in the grid)
    c = tl.program_id(0) // NK
    if c >= tl.load(n_chunks_ptr):  # the grid is an upper bound on the chunks (no host synchronisation)
        return
    key = tl.load(chunk_key_ptr + c)
    e0 = tl.load(chunk_e0_ptr + c)
    e1 = tl.load(chunk_e1_ptr + c)
    hk = key // num_gblocks
    gb = key % num_gblocks
    krow0 = tl.load(gb_krow0_ptr + gb)
    kend = tl.load(gb_kend_ptr + gb)
    krow = krow0 + (tl.program_id(0) % NK) * BK + tl.arange(0, BK)
    k_ok = krow < kend
    d = tl.arange(0, BD)
    dm = d < D
    kt, vt = kv_tile(k_ptr, v_ptr, krow, k_ok, hk, d, dm, stride_kr, stride_kh)
    dk = tl.full([BK, BD], 0.0, tl.float32)
    dv = tl.full([BK, BD], 0.0, tl.float32)
    mm = tl.arange(0, M)
    ti = mm // GP
    g = mm % GP
    heads = hk * G + g
    if not PREFETCH:  # Triton's pipeliner: a step's loads go out after the step before's matmuls
        for e in range(e0, e1, TP):
            e_ok = (e + ti < e1) & (g < G)
            r = tl.load(entry_row_ptr + e + ti, mask=e_ok, other=0)
            q_krow, q, do, lse, delta = _dkdv_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, row_kbase_ptr, row_pos_ptr, r,
                                                   heads, e_ok, d, dm, stride_qr, stride_qh, stride_lr)
            dk, dv = _dkdv_step(dk, dv, kt, vt, krow, k_ok, q_krow, q, do, lse, delta, r, e_ok, heads, d, dm, dq_ptr,
                                stride_dqr, stride_dqh, scale_log2, scale, PREC, DQ)
    else:  # step e's rows in registers, loaded during step e - TP (the loop's pipeliner off)
        e_ok = (e0 + ti < e1) & (g < G)
        r = tl.load(entry_row_ptr + e0 + ti, mask=e_ok, other=0)
        q_krow, q, do, lse, delta = _dkdv_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, row_kbase_ptr, row_pos_ptr, r,
                                               heads, e_ok, d, dm, stride_qr, stride_qh, stride_lr)
        r_n = tl.load(entry_row_ptr + e0 + TP + ti, mask=(e0 + TP + ti < e1) & (g < G), other=0)
        for e in tl.range(e0, e1, TP, num_stages=1):
            ok_n = (e + TP + ti < e1) & (g < G)  # the next step's loads go out before this step's matmuls
            q_krow_n, q_n, do_n, lse_n, delta_n = _dkdv_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, row_kbase_ptr,
                                                             row_pos_ptr, r_n, heads, ok_n, d, dm, stride_qr,
                                                             stride_qh, stride_lr)
            r_nn = tl.load(entry_row_ptr + e + 2 * TP + ti, mask=(e + 2 * TP + ti < e1) & (g < G), other=0)
            dk, dv = _dkdv_step(dk, dv, kt, vt, krow, k_ok, q_krow, q, do, lse, delta, r, e_ok, heads, d, dm, dq_ptr,
                                stride_dqr, stride_dqh, scale_log2, scale, PREC, DQ)
            q_krow, q, do, lse, delta, r, e_ok = q_krow_n, q_n, do_n, lse_n, delta_n, r_n, ok_n
            r_n = r_nn
    store_dkdv(dk_ptr, dv_ptr, dk, dv, krow, k_ok, hk, d, dm, scale, stride_dkr, stride_dkh, ATOMIC)


gather_fwd = Tunable(_gather_fwd_kernel, [(4, 3), (4, 2), (8, 3)], key=["G", "D", "BS", "NBI", "DESC"])
gather_dq = Tunable(_gather_dq_kernel, [(4, 2), (4, 3), (8, 2)], key=["G", "D", "BS", "NBI", "DESC"])
