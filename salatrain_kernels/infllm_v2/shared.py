"""Gathered blocks shared by neighbouring queries (``share_tokens`` = TQ > 1): forward and dq.

The gather kernels (gather.py) give each query its own program: the G heads of its group are the rows of the
tile, and every block the query selected is loaded for it alone. Neighbouring queries of a real model select
mostly the same blocks, so here one program takes TQ consecutive sparse rows of one KV group (TQ·G rows, padded
per query to M = the group's power of two, at least 16 / TQ) and walks the *union* of their block lists: each
block is loaded once for all TQ queries, and a per-query bit says which of them selected it. Masks keep the
result exact: a row sees a key only if its query selected the key's block and the key is not after the query.
Where selections do not overlap (i.i.d. random q/k) the union is TQ times a list and the masked rows waste work;
where they overlap the loads drop by up to TQ and the MMA tiles grow TQ-fold. For groups of fewer than 16 heads
the rows of TQ queries may fit in the 16 rows a per-query tile pads to (pack_share): then sharing is never more work
than per-query tiles, whatever the overlap.

The union lists are built on the device (``union_lists``): the tile's TQ lists (global block numbers, the
entries the gather kernels would take) sorted together, runs of one block merged, their query bits summed.
dk/dv are unchanged (the transposed map of plan.py already walks each block once).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import Tunable, next_pow2
from .attn_steps import backward_rows, dq_update, key_rows, online_softmax

SHARE_VALUES = (1, 2, 4, 8, 16)  # powers of two (tile rows); query bits per union entry live in an int32
# a tile shares when its union holds at most this fraction of its rows' list entries (1: every tile). On one H200
# (docs/perf.md, "Sharing only where lists overlap") four queries sharing at 0.5 were 2-5% slower than no sharing on
# i.i.d. random q/k and 5-10% faster at a real model's overlap; sharing every tile ranged from 4% faster to 12% slower
# on random q/k, so 0.5 bounds the loss where lists do not overlap.
SHARE_MAX_UNION = 0.5


@triton.jit
def _shared_rows(rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, hk, G: tl.constexpr, M: tl.constexpr,
                 TQ: tl.constexpr):
    """The tile's rows (TQ queries × M head slots): query slot, head, validity, row (int64) and the global key
    row of the query's own position."""
    mm = tl.arange(0, TQ * M)
    tok = mm // M
    g = mm % M
    heads = hk * G + g
    slot = tl.program_id(0) * TQ + tok
    ok = (slot < n_rows) & (g < G)
    r = tl.load(rows_ptr + slot, mask=ok, other=0).to(tl.int64)
    q_krow = tl.load(row_kbase_ptr + r, mask=ok, other=0) + tl.load(row_pos_ptr + r, mask=ok, other=0)
    return tok, heads, ok, r, q_krow


@triton.jit
def _tile_union(union_ptr, bits_ptr, ucount_ptr, use_ptr, hk, stride_uh, stride_ut, stride_ch):
    """This program's (tile, group) union list and query bits, how many entries it walks, and whether this kernel
    takes the tile at all (``use``; otherwise its rows went through the per-query gather kernels: no entries, no
    stores)."""
    base = hk * stride_uh + tl.program_id(0) * stride_ut
    use = tl.load(use_ptr + hk * stride_ch + tl.program_id(0)) != 0
    n_u = tl.where(use, tl.load(ucount_ptr + hk * stride_ch + tl.program_id(0)), 0)
    return union_ptr + base, bits_ptr + base, n_u, use


@triton.jit
def _union_block(union_ptr, bits_ptr, gb_krow0_ptr, gb_kend_ptr, s, tok, q_krow, ok, BS: tl.constexpr):
    """Union entry s: its first key row, its key rows, which exist, and which (row, key) pairs are visible."""
    gb = tl.load(union_ptr + s)
    bits = tl.load(bits_ptr + s)
    krow0 = tl.load(gb_krow0_ptr + gb)
    krow = krow0 + tl.arange(0, BS)
    k_ok = krow < tl.load(gb_kend_ptr + gb)
    chose = ((bits >> tok) & 1) != 0
    vis = (chose & ok)[:, None] & k_ok[None, :] & (krow[None, :] <= q_krow[:, None])
    return krow0, krow, k_ok, vis


@triton.jit
def _shared_fwd_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, lse_ptr, union_ptr, bits_ptr, ucount_ptr, use_ptr, gb_krow0_ptr,
    gb_kend_ptr,
    rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, out_row_base,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_or, stride_oh, stride_lr, stride_uh, stride_ut, stride_ch,
    scale_log2,
    G: tl.constexpr, M: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr, DESC: tl.constexpr, FULL: tl.constexpr,
):
    hk = tl.program_id(1)
    tok, heads, ok, r, q_krow = _shared_rows(rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, hk, G, M, TQ)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + (r * stride_qr + heads * stride_qh)[:, None] + d[None, :],
                mask=ok[:, None] & dm[None, :], other=0.0)
    u_ptr, b_ptr, n_u, use = _tile_union(union_ptr, bits_ptr, ucount_ptr, use_ptr, hk, stride_uh, stride_ut,
                                         stride_ch)
    m_i = tl.full([TQ * M], float("-inf"), tl.float32)
    l_i = tl.full([TQ * M], 0.0, tl.float32)
    acc = tl.full([TQ * M, BD], 0.0, tl.float32)
    for s in range(0, n_u):
        krow0, krow, k_ok, vis = _union_block(u_ptr, b_ptr, gb_krow0_ptr, gb_kend_ptr, s, tok, q_krow, ok, BS)
        kv_off = krow.to(tl.int64) * stride_kr + hk * stride_kh
        kt = key_rows(k_ptr, k_desc, kv_off, k_ok, krow0, hk, d, dm, BS, BD, DESC, FULL)
        sc = tl.where(vis, tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2, float("-inf"))
        m_i, alpha, p, l_i = online_softmax(sc, m_i, l_i)
        vt = key_rows(v_ptr, v_desc, kv_off, k_ok, krow0, hk, d, dm, BS, BD, DESC, FULL)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    l_ok = l_i > 0
    l_div = tl.where(l_ok, l_i, 1.0)
    r_out = r - out_row_base
    ok = tl.where(use, ok, False)  # (a tile the gather kernels took: no stores)
    tl.store(o_ptr + (r_out * stride_or + heads * stride_oh)[:, None] + d[None, :],
             (acc / l_div[:, None]).to(o_ptr.dtype.element_ty), mask=ok[:, None] & dm[None, :])
    tl.store(lse_ptr + r_out * stride_lr + heads, tl.where(l_ok, m_i + tl.log2(l_div), float("inf")), mask=ok)


@triton.jit
def _shared_dq_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, do_ptr, lse_ptr, delta_ptr, dq_ptr, union_ptr, bits_ptr, ucount_ptr,
    use_ptr, gb_krow0_ptr, gb_kend_ptr, rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, out_row_base,
    stride_qr, stride_qh, stride_kr, stride_kh, stride_lr, stride_uh, stride_ut, stride_ch, stride_dqr, stride_dqh,
    scale_log2, scale,
    G: tl.constexpr, M: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    PREC: tl.constexpr, DESC: tl.constexpr, FULL: tl.constexpr,
):
    hk = tl.program_id(1)
    tok, heads, ok, r, q_krow = _shared_rows(rows_ptr, n_rows, row_pos_ptr, row_kbase_ptr, hk, G, M, TQ)
    d = tl.arange(0, BD)
    dm = d < D
    qd_off, qd_mask, q, do, lse, delta = backward_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, r, heads, ok, d, dm,
                                                       stride_qr, stride_qh, stride_lr)
    u_ptr, b_ptr, n_u, use = _tile_union(union_ptr, bits_ptr, ucount_ptr, use_ptr, hk, stride_uh, stride_ut,
                                         stride_ch)
    dq = tl.full([TQ * M, BD], 0.0, tl.float32)
    for s in range(0, n_u):
        krow0, krow, k_ok, vis = _union_block(u_ptr, b_ptr, gb_krow0_ptr, gb_kend_ptr, s, tok, q_krow, ok, BS)
        kv_off = krow.to(tl.int64) * stride_kr + hk * stride_kh
        kt = key_rows(k_ptr, k_desc, kv_off, k_ok, krow0, hk, d, dm, BS, BD, DESC, FULL)
        vt = key_rows(v_ptr, v_desc, kv_off, k_ok, krow0, hk, d, dm, BS, BD, DESC, FULL)
        sc = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale_log2
        p = tl.where(vis, tl.exp2(sc - lse[:, None]), 0.0)
        dq = dq_update(dq, p, do, kt, vt, delta, PREC)
    dq_off = ((r - out_row_base) * stride_dqr + heads * stride_dqh)[:, None] + d[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=tl.where(use, qd_mask, False))


def pack_share(group: int) -> int:
    """Queries per shared tile that fill the 16 rows of tl.dot's smallest tile with a group of ``group`` heads
    (padded to a power of two): 16 // that, 1 for groups of 16 or more. Such a tile costs a step per block of the
    union of its queries' lists, where their own tiles (16 rows each, mostly padding) cost one per entry."""
    return max(1, 16 // next_pow2(group))


def check_share(tq: int, max_union: float = SHARE_MAX_UNION) -> None:
    if tq not in SHARE_VALUES:
        raise ValueError(f"share_tokens must be one of {SHARE_VALUES} (got {tq}): the tile's rows, share_tokens × "
                         "the group padded to a power of two, must be a power of two")
    if not 0.0 <= max_union <= 1.0:
        raise ValueError(f"share_max_union must be within [0, 1] (got {max_union}): the largest union list, as a "
                         "fraction of the tile's own list entries, at which a tile shares (1: always)")


shared_fwd = Tunable(_shared_fwd_kernel, [(4, 2), (8, 2), (4, 3)], key=["G", "D", "BS", "TQ", "DESC"])
shared_dq = Tunable(_shared_dq_kernel, [(4, 2), (8, 2), (4, 3)], key=["G", "D", "BS", "TQ", "DESC"])


def union_lists(idx3: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, row_doc_base: torch.Tensor,
                num_gblocks: int, tq: int, max_union: float = 1.0):
    """Per tile of ``tq`` consecutive ``rows`` and KV group: the union of the blocks the gather kernels would take
    (the first ``counts`` entries of each row's list), as global block numbers ascending [HKV, tiles, tq·K + 1],
    which of the tile's queries chose each (bit j = the tile's j-th row) [same shape], how many [HKV, tiles], and
    whether the tile shares [HKV, tiles] int32: its rows are of one document and its union holds at most
    ``max_union`` × their list entries (1.0: every such tile). On the device, no host synchronisation."""
    check_share(tq)
    n = rows.numel()
    tiles = triton.cdiv(n, tq)
    dev = idx3.device
    padded = torch.zeros(tiles * tq, dtype=torch.long, device=dev)
    padded[:n] = rows.long()
    padded[n:] = rows[-1] if n else 0  # a short last tile's empty slots: its last row (same document)
    real = torch.arange(tiles * tq, device=dev) < n
    lists = idx3.index_select(1, padded)  # [HKV, tiles·tq, K] int32
    k = lists.shape[-1]
    taken = (torch.arange(k, device=dev) < counts.index_select(1, padded)[..., None]) & real[None, :, None]
    # one int32 sort key per entry: global block x tq + the entry's query in the tile (so equal blocks sort together
    # and the query's bit comes back with the key); entries not taken sort last
    if (num_gblocks + 1) * tq >= 2**31:
        raise ValueError(f"{num_gblocks} blocks x share_tokens {tq} overflow the union's int32 keys")
    query = (torch.arange(tq * k, device=dev, dtype=torch.int32) // k).view(tq, k)
    keys = (lists + row_doc_base[padded].to(torch.int32)[None, :, None]).view(lists.shape[0], tiles, tq, k) * tq
    keys = torch.where(taken.view(keys.shape), keys + query, num_gblocks * tq).view(lists.shape[0], tiles, tq * k)
    keys = torch.sort(keys, dim=-1).values
    valid = keys < num_gblocks * tq
    vals = keys // tq
    bits = torch.where(valid, 1 << (keys % tq), 0)
    new = valid.clone()
    new[..., 1:] &= vals[..., 1:] != vals[..., :-1]
    slot = (torch.cumsum(new, -1, dtype=torch.int32) - 1).clamp_(min=0).long()
    width = tq * k + 1  # the last column takes the writes of entries that start no run (never read)
    union = torch.zeros(*keys.shape[:2], width, dtype=torch.int32, device=dev)
    union.scatter_(-1, torch.where(new, slot, width - 1), vals)
    ubits = torch.zeros(*keys.shape[:2], width, dtype=torch.int32, device=dev)
    ubits.scatter_add_(-1, slot, bits)
    ucount = new.sum(-1, dtype=torch.int32)
    entries = taken.view(ucount.shape[0], tiles, tq * k).sum(-1)
    # a tile whose rows span two documents never shares: one document's blocks would meet the other's rows in the
    # same matmul, where a masked probability (0) times a non-finite K/V value is still NaN
    ends = row_doc_base[padded].view(tiles, tq)
    one_doc = ends[:, 0] == ends[:, -1]
    return union, ubits, ucount, ((ucount <= max_union * entries) & one_doc[None, :]).int()
