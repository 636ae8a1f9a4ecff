"""Stage (a): block scores. Mean-pooled compressed keys, per-head softmax, sum over the GQA group, max-pool.

One program = a tile of BQ consecutive queries of one document × the G heads of one KV group (rows
M = BQ·GP, GP = G rounded up to a power of two, padded heads masked). Two passes over compressed keys:

  pass 1  log-sum-exp per (query, head) over the normaliser windows ending at or before t: the exact
          windows (kernel_size / stride) or the coarse ones (4x kernel and stride) for normalizer="coarse";
  pass 2  p = exp(q·k_cmp·scale − LSE) per head, summed over the group, max-pooled into 64-token blocks and
          written as fp32 block scores [HKV, rows, NBM]. No per-head score matrix is ever stored.

Block b overlaps the windows j in [b·R − (C−1), b·R + R − 1] (R = block/stride, C = kernel/stride,
C − 1 <= R). Every window's probability is computed once: a pass-2 tile of NBT blocks takes the NBT·R
windows that start inside those blocks in one tl.dot and reduces them twice, into `own[b]` (max over the R
windows starting in b) and `tail[b]` (max over the last C−1 of them, which also overlap block b+1). The block
score is bs(b) = max(own[b], tail[b−1]), combined where rows are read (the selection kernel, or
`combine_tail`). Recomputing the shared windows in a second dot instead would round differently and break
the exact ties between neighbouring blocks that share their best window. A block with no window ended by
t scores -inf. Tiles are launched latest-queries first, so the longest programs start first.

FUSED (interface.FUSED_SELECT, opt-in) keeps the scores on chip instead: each step's block scores update every
query's running list of its best blocks (selection.py: keep_largest), and the program writes the block lists at
the end. Exact, but 5-12x slower than scoring then selecting (docs/perf.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import (
    LOG2E,
    Tunable,
    dot_precision,
    interpreting,
    new_empty,
    next_pow2,
    resolve_backend,
    row_max,
    row_sum,
    should_tune,
)
from .attn_steps import first_local_block, online_softmax
from .layout import DocLayout, compress_keys
from .stages_torch import infllmv2_block_scores_torch
from .params import SparseParams, check_qkv, triton_scoring_ok
from .selection import block_keys, empty_top, keep_largest, store_top_lists

__all__ = ["infllmv2_block_scores", "BlockScorer", "combine_tail"]

# Both passes take first the column steps that every row of a tile sees whole, without the per-element masks
# (same values, fewer element-wise operations); off: every step masked (the kernel before 2026-12-03, a sweep knob)
SPLIT_MASKS = True


@triton.jit
def _block_maxes(q, kc_ptr, cfirst, ccount, hk, stride_cr, stride_ch, scale_log2, lse, clast, row_ok, clast_q, nblocks,
                 b0, cc, nbt, d, dmask, BQ: tl.constexpr, GP: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                 NBT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr):
    """One pass-2 step: the NBT blocks from b0, their `own` and `tail` maxima [BQ, NBT] (tail = own when C = 1).
    Without MASKED every window of the step is ended by every row's query and every row is real (the caller
    checks), so the probabilities skip the per-element mask."""
    j = b0 * R + cc
    kc_off = (cfirst + j).to(tl.int64) * stride_cr + hk * stride_ch
    if MASKED:
        kc = tl.load(kc_ptr + kc_off[:, None] + d[None, :], mask=(j < ccount)[:, None] & dmask[None, :], other=0.0)
    else:
        kc = tl.load(kc_ptr + kc_off[:, None] + d[None, :], mask=dmask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(kc), input_precision=PREC) * scale_log2
    if MASKED:
        p = tl.where((j[None, :] <= clast[:, None]) & row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
    else:
        p = tl.exp2(s - lse[:, None])
    per_block = tl.reshape(row_sum(tl.reshape(p, (BQ, GP, BC)), 1), (BQ, NBT, R))
    blk = b0 + nbt
    own_ok = (blk[None, :] * R <= clast_q[:, None]) & (blk[None, :] < nblocks)
    own = tl.where(own_ok, row_max(per_block, 2), float("-inf"))
    tail = own
    if C > 1:
        rr = tl.arange(0, R)
        tail_sel = tl.where(rr[None, None, :] >= R - (C - 1), per_block, 0.0)
        tail_ok = (blk[None, :] * R + R - (C - 1) <= clast_q[:, None]) & (blk[None, :] < nblocks)
        tail = tl.where(tail_ok, row_max(tail_sel, 2), float("-inf"))
    return blk, own, tail


@triton.jit
def _store_block_maxes(out_row, tail_row, own, tail, blk, q_ok, num_blocks_out, C: tl.constexpr):
    """Write a pass-2 step's own (and, C > 1, tail) maxima of blocks blk into the rows' score buffers."""
    st_mask = q_ok[:, None] & (blk[None, :] < num_blocks_out)
    tl.store(out_row[:, None] + blk[None, :], own, mask=st_mask)
    if C > 1:
        tl.store(tail_row[:, None] + blk[None, :], tail, mask=st_mask)


@triton.jit
def _block_scores_kernel(
    q_ptr, kc_ptr, kn_ptr, out_ptr, tail_ptr,
    tile_row0_ptr, tile_nrows_ptr, tile_doc_ptr, row_pos_ptr,
    doc_cfirst_ptr, doc_ccount_ptr, doc_nfirst_ptr, doc_ncount_ptr, doc_nblocks_ptr,
    n_tiles, row_base, num_blocks_out,
    stride_qr, stride_qh, stride_cr, stride_ch, stride_nr, stride_nh, stride_oh, stride_or,
    scale_log2,
    idx_ptr, stride_ih, stride_ir, k_slots,
    G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    KS: tl.constexpr, KSTRIDE: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    NKS: tl.constexpr, NSTRIDE: tl.constexpr,
    NBT: tl.constexpr, BCN: tl.constexpr, WRITE_ALL: tl.constexpr, PREC: tl.constexpr,
    FUSED: tl.constexpr, KP: tl.constexpr, LP: tl.constexpr, INIT: tl.constexpr, WIN: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr, SPLIT: tl.constexpr,
):
    BS: tl.constexpr = R * KSTRIDE
    M: tl.constexpr = BQ * GP
    BC: tl.constexpr = NBT * R
    tile = n_tiles - 1 - tl.program_id(0)
    hk = tl.program_id(1)
    row0 = tl.load(tile_row0_ptr + tile)
    nrows = tl.load(tile_nrows_ptr + tile)
    doc = tl.load(tile_doc_ptr + tile)
    pos0 = tl.load(row_pos_ptr + row0)
    cfirst = tl.load(doc_cfirst_ptr + doc)
    ccount = tl.load(doc_ccount_ptr + doc)
    nfirst = tl.load(doc_nfirst_ptr + doc)
    ncount = tl.load(doc_ncount_ptr + doc)
    nblocks = tl.load(doc_nblocks_ptr + doc)
    t_last = pos0 + nrows - 1

    mm = tl.arange(0, M)
    qi = mm // GP
    g = mm % GP
    row_ok = (qi < nrows) & (g < G)
    t = pos0 + qi
    d = tl.arange(0, BD)
    dmask = d < D
    q_off = (row0 + qi).to(tl.int64) * stride_qr + (hk * G + g) * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)

    # pass 1: log2-sum-exp2 over the normaliser windows with end <= t; with SPLIT the steps every row of the tile
    # sees whole (windows that end before its first query) go first, without the per-element mask
    nlast = tl.where(t + 1 >= NKS, (t + 1 - NKS) // NSTRIDE, -1)
    n_cols = tl.minimum(tl.where(t_last + 1 >= NKS, (t_last + 1 - NKS) // NSTRIDE + 1, 0), ncount)
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.full([M], 0.0, tl.float32)
    cn = tl.arange(0, BCN)
    n_free = 0
    if SPLIT:
        nlast0 = tl.where(pos0 + 1 >= NKS, (pos0 + 1 - NKS) // NSTRIDE, -1)
        n_free = tl.minimum(((nlast0 + 1) // BCN) * BCN, n_cols)
        for j0 in range(0, n_free, BCN):
            kn_off = (nfirst + j0 + cn).to(tl.int64) * stride_nr + hk * stride_nh
            kn = tl.load(kn_ptr + kn_off[:, None] + d[None, :], mask=dmask[None, :], other=0.0)
            s = tl.dot(q, tl.trans(kn), input_precision=PREC) * scale_log2
            m_i, _, _, l_i = online_softmax(s, m_i, l_i)
    for j0 in range(n_free, n_cols, BCN):
        j = j0 + cn
        kn_off = (nfirst + j).to(tl.int64) * stride_nr + hk * stride_nh
        kn = tl.load(kn_ptr + kn_off[:, None] + d[None, :], mask=(j < n_cols)[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kn), input_precision=PREC) * scale_log2
        s = tl.where(j[None, :] <= nlast[:, None], s, float("-inf"))
        m_i, _, _, l_i = online_softmax(s, m_i, l_i)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))

    # pass 2: probabilities summed over the group, max-pooled into blocks (SPLIT: unmasked steps first, as above,
    # where the tile is full: every row a real query and head)
    clast = tl.where(t + 1 >= KS, (t + 1 - KS) // KSTRIDE, -1)
    bq = tl.arange(0, BQ)
    tq = pos0 + bq
    clast_q = tl.where(tq + 1 >= KS, (tq + 1 - KS) // KSTRIDE, -1)
    q_ok = bq < nrows
    row_off = hk * stride_oh + (row0 + bq - row_base).to(tl.int64) * stride_or
    out_row = out_ptr + row_off
    tail_row = tail_ptr + row_off  # same strides as out
    nb_hi = tl.minimum(nblocks, t_last // BS + 1)
    cc = tl.arange(0, BC)
    nbt = tl.arange(0, NBT)
    if FUSED:  # each query's running list of its best non-forced blocks, [n_init, first_local)
        cur_q = tq // BS
        first_local = first_local_block(tq, BS, WIN, BLOCK_LOCAL)
        n_init = tl.minimum(first_local, INIT)
        top = empty_top(k_slots - n_init - (cur_q - first_local + 1), KP)
        carry = tl.full([BQ], float("-inf"), tl.float32)  # tail of the block before this step's first
        for b0 in range(0, nb_hi, NBT):
            blk, own, tail = _block_maxes(q, kc_ptr, cfirst, ccount, hk, stride_cr, stride_ch, scale_log2, lse, clast,
                                          row_ok, clast_q, nblocks, b0, cc, nbt, d, dmask, BQ, GP, R, C, NBT, BC, PREC,
                                          True)
            bs = own  # bs(b) = max(own[b], tail[b - 1]) with tail shifted one block right, then the running lists
            if C > 1:
                prev = row_max(tl.where(nbt[None, :, None] == nbt[None, None, :] + 1, tail[:, None, :],
                                        float("-inf")), 2)
                bs = tl.maximum(own, tl.where(nbt[None, :] == 0, carry[:, None], prev))
                carry = row_max(tl.where(nbt[None, :] == NBT - 1, tail, float("-inf")), 1)
            cand = q_ok[:, None] & (blk[None, :] >= n_init[:, None]) & (blk[None, :] < first_local[:, None])
            top = keep_largest(top, block_keys(bs, blk, cand))
    else:
        nb_free = 0
        if SPLIT and G == GP:
            clast0 = tl.where(pos0 + 1 >= KS, (pos0 + 1 - KS) // KSTRIDE, -1)
            nb_free = tl.minimum(tl.where(nrows == BQ, ((clast0 + 1) // BC) * NBT, 0), nb_hi)
            for b0 in range(0, nb_free, NBT):
                blk, own, tail = _block_maxes(q, kc_ptr, cfirst, ccount, hk, stride_cr, stride_ch, scale_log2, lse,
                                              clast, row_ok, clast_q, nblocks, b0, cc, nbt, d, dmask, BQ, GP, R, C,
                                              NBT, BC, PREC, False)
                _store_block_maxes(out_row, tail_row, own, tail, blk, q_ok, num_blocks_out, C)
        for b0 in range(nb_free, nb_hi, NBT):
            blk, own, tail = _block_maxes(q, kc_ptr, cfirst, ccount, hk, stride_cr, stride_ch, scale_log2, lse, clast,
                                          row_ok, clast_q, nblocks, b0, cc, nbt, d, dmask, BQ, GP, R, C, NBT, BC, PREC,
                                          True)
            _store_block_maxes(out_row, tail_row, own, tail, blk, q_ok, num_blocks_out, C)
    if FUSED:
        idx_row = idx_ptr + hk * stride_ih + (row0 + bq).to(tl.int64) * stride_ir
        store_top_lists(top, idx_row, q_ok, n_init, first_local, cur_q, KP, LP)
    if WRITE_ALL:
        neg = tl.full([BQ, NBT], float("-inf"), tl.float32)
        for b0 in range(((nb_hi + NBT - 1) // NBT) * NBT, num_blocks_out, NBT):
            blk = b0 + nbt
            st_mask = q_ok[:, None] & (blk[None, :] < num_blocks_out)
            tl.store(out_row[:, None] + blk[None, :], neg, mask=st_mask)
            if C > 1:
                tl.store(tail_row[:, None] + blk[None, :], neg, mask=st_mask)


_block_scores = Tunable(_block_scores_kernel, [(8, 2), (8, 3), (4, 2)], key=["G", "D", "BQ", "NKS", "R", "FUSED"])


class BlockScorer:
    """Compressed keys and per-document tables of one call; `run` scores a set of query tiles."""

    def __init__(self, q3: torch.Tensor, k3: torch.Tensor, layout: DocLayout, params: SparseParams, scale: float):
        self.q3, self.layout, self.params, self.scale = q3, layout, params, scale
        self.kv_heads = k3.shape[1]
        self.group = q3.shape[1] // self.kv_heads
        rows, cfirst, ccount = layout.windows(params.kernel_size, params.kernel_stride)
        self.kc = compress_keys(k3, rows, params.kernel_size, q3.dtype)
        if params.normalizer == "coarse":
            nks, nstride = params.coarse
            rows2, nfirst, ncount = layout.windows(nks, nstride)
            self.kn = compress_keys(k3, rows2, nks, q3.dtype)
        else:
            nks, nstride, nfirst, ncount, self.kn = params.kernel_size, params.kernel_stride, cfirst, ccount, self.kc
        self.norm_kernel = (nks, nstride)
        nblocks = [-(-n // params.block_size) for n in layout.length]
        tables = dict(cfirst=cfirst, ccount=ccount, nfirst=nfirst, ncount=ncount, nblocks=nblocks)
        self.docs = {f"doc_{name}_ptr": layout.doc_tensor(x) for name, x in tables.items()}
        self.num_blocks = layout.max_blocks(params.block_size)
        ratio = params.block_size // params.kernel_stride
        self.ratio, self.kernel_ratio = ratio, params.kernel_size // params.kernel_stride
        self.group_pad = next_pow2(self.group)
        small = dot_precision(q3.dtype) == "ieee" and not interpreting()  # fp32 FMA dots: small tiles (tests)
        self.cols_per_step = 32 if small else 64
        self.blocks_per_tile = max(1, self.cols_per_step // ratio)
        cols = self.blocks_per_tile * ratio
        rows_target = 64 if small or cols > 128 else 128
        self.rows_per_tile = max(1, rows_target // self.group_pad)
        if self.rows_per_tile * self.group_pad < 16:
            self.rows_per_tile = 16 // self.group_pad

    def new_buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(own, tail) fp32 [HKV, rows, NBM] score buffers (tail aliases own when no window spans 2 blocks)."""
        own = new_empty((self.kv_heads, rows, self.num_blocks), torch.float32, self.q3.device)
        tail = new_empty(own.shape, torch.float32, own.device) if self.kernel_ratio > 1 else own
        return own, tail

    def run(self, own: torch.Tensor, tail: torch.Tensor, row_base: int, tiles, write_all: bool) -> None:
        """Score the rows in `tiles` (first row, rows, doc) into own/tail [HKV, rows - row_base, NBM]."""
        self._launch(tiles, out_ptr=own, tail_ptr=tail, row_base=row_base, num_blocks_out=own.shape[-1],
                     stride_oh=own.stride(0), stride_or=own.stride(1), WRITE_ALL=write_all,
                     idx_ptr=own, stride_ih=0, stride_ir=0, k_slots=0, FUSED=False, KP=1, LP=1)

    def select(self, block_idx: torch.Tensor, tiles) -> None:
        """Score and select at once (selection.fused_select_ok must hold): the lists of the rows in `tiles` go
        straight to block_idx [HKV, rows, K] (their first slots; the rest is left as it is, -1), no score buffer."""
        params = self.params
        dummy = torch.empty(1, dtype=torch.float32, device=self.q3.device)
        k_slots = block_idx.shape[-1]
        self._launch(tiles, out_ptr=dummy, tail_ptr=dummy, row_base=0, num_blocks_out=0, stride_oh=0, stride_or=0,
                     WRITE_ALL=False, idx_ptr=block_idx, stride_ih=block_idx.stride(0),
                     stride_ir=block_idx.stride(1), k_slots=k_slots, FUSED=True, KP=next_pow2(k_slots),
                     LP=next_pow2(params.window_size // params.block_size + 2), INIT=params.init_blocks,
                     WIN=params.window_size, BLOCK_LOCAL=params.local_blocks == "block")

    def _launch(self, tiles, **kwargs) -> None:
        row0, nrows, docs = tiles
        n_tiles = row0.numel()
        if n_tiles == 0:
            return
        q3, dim = self.q3, self.q3.shape[-1]
        nks, nstride = self.norm_kernel
        kwargs = dict(dict(INIT=0, WIN=0, BLOCK_LOCAL=False, SPLIT=SPLIT_MASKS), **kwargs)
        _block_scores.launch(
            (n_tiles, self.kv_heads), should_tune(q3, self.group),
            q_ptr=q3, kc_ptr=self.kc, kn_ptr=self.kn,
            tile_row0_ptr=row0, tile_nrows_ptr=nrows, tile_doc_ptr=docs, row_pos_ptr=self.layout.row_pos,
            **self.docs, n_tiles=n_tiles,
            stride_qr=q3.stride(0), stride_qh=q3.stride(1), stride_cr=self.kc.stride(0), stride_ch=self.kc.stride(1),
            stride_nr=self.kn.stride(0), stride_nh=self.kn.stride(1), scale_log2=self.scale * LOG2E,
            G=self.group, GP=self.group_pad, BQ=self.rows_per_tile, D=dim, BD=max(16, next_pow2(dim)),
            KS=self.params.kernel_size, KSTRIDE=self.params.kernel_stride, R=self.ratio, C=self.kernel_ratio,
            NKS=nks, NSTRIDE=nstride, NBT=self.blocks_per_tile, BCN=self.cols_per_step,
            PREC=dot_precision(q3.dtype), **kwargs,
        )


def combine_tail(own: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Block scores from the kernel's halves: bs(b) = max(own[b], tail[b-1]) along the last dim."""
    if tail is own:
        return own
    out = own.clone()
    out[..., 1:] = torch.maximum(own[..., 1:], tail[..., :-1])
    return out


def infllmv2_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    normalizer: str = "exact",
    coarse_kernel_size: int | None = None,
    coarse_kernel_stride: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block scores [B, HKV, Tq, NBM] fp32 (NBM = blocks of the longest document; -inf where undefined).

    q [B, Tq, HQ, D], k [B, Tk, HKV, D]; semantics in the package docstring (steps 1-3).
    """
    check_qkv(q, k, None, cu_seqlens)
    params = SparseParams(
        block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride, normalizer=normalizer,
        coarse_kernel_size=coarse_kernel_size, coarse_kernel_stride=coarse_kernel_stride,
    )
    kwargs = dict(
        block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride, scale=scale,
        cu_seqlens=cu_seqlens, normalizer=normalizer, coarse_kernel_size=coarse_kernel_size,
        coarse_kernel_stride=coarse_kernel_stride,
    )
    if resolve_backend(backend, q) == "torch":
        return infllmv2_block_scores_torch(q, k, **kwargs)
    if not triton_scoring_ok(block_size, kernel_size, kernel_stride):
        raise ValueError(f"{params.geometry_problem()} (use backend='torch')")
    batch, seqlen_q, heads, dim = q.shape
    kv_heads = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    layout = DocLayout.build(q, k, cu_seqlens)
    q3 = q.contiguous().view(batch * seqlen_q, heads, dim)
    k3 = k.contiguous().view(batch * k.shape[1], kv_heads, dim)
    scorer = BlockScorer(q3, k3, layout, params, scale)
    own, tail = scorer.new_buffers(layout.num_rows)
    scorer.run(own, tail, 0, layout.tiles(scorer.rows_per_tile), write_all=True)
    return combine_tail(own, tail).view(kv_heads, batch, seqlen_q, -1).permute(1, 0, 2, 3)
