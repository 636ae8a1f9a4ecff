"""Stage (b): per-query top-K block selection with InfLLM-V2's forcing and tie rules.

One program = BR query rows × one KV head; the whole score row (NBM blocks, padded to a power of two) lives
in registers. Forced blocks (init, local window under either rule, see `first_local_block`) become +inf, blocks
after the current one are excluded.
Scores map to order-preserving uint32 keys (0 = excluded); a 32-step bitwise search finds the K-th largest key θ per
row (one compare + row sum per step), then the selection is {key > θ} plus the lowest-index blocks with
key == θ (exclusive cumsum), which is exactly "sort by (score desc, index asc), keep K". Indices are
compacted in ascending order with a cumsum scatter; unused slots get -1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import new_empty, next_pow2, resolve_backend, row_cumsum, row_max, row_min, row_sum
from .attn_steps import first_local_block
from .layout import DenseRows, DocLayout
from .stages_torch import infllmv2_select_torch
from .params import SparseParams

__all__ = ["infllmv2_select", "select_rows", "fused_select_ok"]

# The scoring kernel's fused form (score.py, FUSED) selects while it scores: each query keeps a running list of its
# best non-forced blocks as int64 keys (the score's order-preserving bits above INDEX_BITS bits of reversed block
# index, so larger key = chosen first, exactly this kernel's (score desc, index asc) order), and the lists are
# written at the end with the forced blocks around them. No block score goes to global memory. Constants inside the
# jit helpers: NO_KEY = -2^62 ("no candidate"); empty slots hold -1 - slot, slots past a row's budget 2^62 - slot.
INDEX_BITS = 24


def fused_select_ok(params: SparseParams, k_slots: int, num_blocks: int) -> bool:
    """Whether the fused form selects exactly as this kernel: every forced block (init and local window, at most
    init + window / block + 2) fits in the K slots, or K covers every block; block indices fit INDEX_BITS."""
    forced = params.init_blocks + params.window_size // params.block_size + 2
    return num_blocks < (1 << INDEX_BITS) and (k_slots >= num_blocks or k_slots >= forced)


@triton.jit
def block_keys(sc, blk, ok):
    """Keys [rows, n] of block scores sc [rows, n] of blocks blk [n]: distinct, >= 0, ordered as the selection
    ranks blocks (score descending, then block index ascending); NO_KEY where not ok."""
    bits = (sc + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0
    key32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order == float order
    key = ((key32.to(tl.int64) + 2147483648) << 24) + (16777215 - blk[None, :]).to(tl.int64)
    return tl.where(ok, key, -4611686018427387904)


@triton.jit
def empty_top(cap, P: tl.constexpr):
    """A running list [rows, P] with room for cap [rows] keys: distinct negatives in the first cap slots (taken
    first), distinct values above every key in the rest (never replaced)."""
    jj = tl.arange(0, P).to(tl.int64)
    return tl.where(jj[None, :] < cap[:, None].to(tl.int64), -1 - jj[None, :], 4611686018427387904 - jj[None, :])


@triton.jit
def keep_largest(top, cand):
    """top [rows, P] (distinct keys) after taking the candidates cand [rows, n] (distinct keys or NO_KEY): each
    candidate above a row's smallest key replaces it, largest first, so top ends with the largest of both. One
    step per candidate that enters (most rows' lists are full and most blocks stay out)."""
    low = row_min(top, 1)
    cand = tl.where(cand > low[:, None], cand, -4611686018427387904)
    while row_max(row_max(cand, 1), 0) > -4611686018427387904:
        best = row_max(cand, 1)
        enter = best > low
        top = tl.where((top == low[:, None]) & enter[:, None], best[:, None], top)
        cand = tl.where(cand == best[:, None], -4611686018427387904, cand)
        low = row_min(top, 1)
        cand = tl.where(cand > low[:, None], cand, -4611686018427387904)
    return top


@triton.jit
def store_top_lists(top, out_row, row_ok, n_init, first_local, cur, P: tl.constexpr, LP: tl.constexpr):
    """Write each row's list in ascending order: init blocks [0, n_init), the running list's blocks (all in
    [n_init, first_local)), the local window [first_local, cur]. Slots after stay as they were (-1)."""
    real = (top >= 0) & (top < 2305843009213693952)
    blk = tl.where(real, 16777215 - (top & 16777215), 1 << 30).to(tl.int32)
    blk = tl.sort(blk, 1)
    n_top = row_sum(real.to(tl.int32), 1)
    jj = tl.arange(0, P)
    tl.store(out_row[:, None] + jj[None, :], jj[None, :] + 0 * blk,
             mask=row_ok[:, None] & (jj[None, :] < n_init[:, None]))
    tl.store(out_row[:, None] + n_init[:, None] + jj[None, :], blk,
             mask=row_ok[:, None] & (jj[None, :] < n_top[:, None]))
    ll = tl.arange(0, LP)
    local = first_local[:, None] + ll[None, :]
    tl.store(out_row[:, None] + (n_init + n_top)[:, None] + ll[None, :], local,
             mask=row_ok[:, None] & (local <= cur[:, None]))


@triton.jit
def _select_kernel(
    score_ptr, tail_ptr, idx_ptr, row_pos_ptr, row_dense_ptr,
    row_lo, row_hi, score_row_base, num_blocks, dense_len,
    stride_sh, stride_sr, stride_ih, stride_ir,
    BS: tl.constexpr, INIT: tl.constexpr, WIN: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    NBP: tl.constexpr, BR: tl.constexpr, SKIP_DENSE: tl.constexpr, HAS_TAIL: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr, PER_ROW_DENSE: tl.constexpr,
):
    hk = tl.program_id(1)
    rr = row_lo + tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = rr < row_hi
    t = tl.load(row_pos_ptr + rr, mask=r_ok, other=0)
    live = r_ok
    if SKIP_DENSE:
        if PER_ROW_DENSE:  # the sequence rule with documents on both sides of dense_len
            live = live & (t >= tl.load(row_dense_ptr + rr, mask=r_ok, other=0))
        else:
            live = live & (t >= dense_len)
    bb = tl.arange(0, NBP)
    cur = t // BS
    valid = (bb[None, :] <= cur[:, None]) & (bb[None, :] < num_blocks) & live[:, None]
    s_off = hk * stride_sh + (rr - score_row_base).to(tl.int64) * stride_sr
    sc = tl.load(score_ptr + s_off[:, None] + bb[None, :], mask=valid, other=float("-inf"))
    if HAS_TAIL:  # windows starting in block b-1 that reach into b
        prev = tl.load(tail_ptr + s_off[:, None] + bb[None, :] - 1, mask=valid & (bb[None, :] > 0),
                       other=float("-inf"))
        sc = tl.maximum(sc, prev)
    first_local = first_local_block(t, BS, WIN, BLOCK_LOCAL)
    forced = (bb[None, :] < INIT) | ((bb[None, :] >= first_local[:, None]) & (bb[None, :] <= cur[:, None]))
    sc = tl.where(forced, float("inf"), sc) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = sc.to(tl.int32, bitcast=True)
    key32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order == float order
    # the same order in uint32 (flipping the sign bit maps signed order onto unsigned); valid keys > 0 = excluded
    key = tl.where(valid, (key32 ^ -2147483648).to(tl.uint32, bitcast=True), 0)
    theta = tl.full([BR], 0, tl.uint32)
    step = tl.full([BR], 2147483648, tl.uint32)
    for _ in range(32):  # theta = largest value with #(key >= theta) >= K
        cand = theta + step
        count = row_sum((key >= cand[:, None]).to(tl.int32), 1)
        theta = tl.where(count >= K, cand, theta)
        step = step >> 1

    above = key > theta[:, None]
    tie = ((key == theta[:, None]) & valid).to(tl.int32)
    tie_rank = row_cumsum(tie, 1) - tie
    room = K - row_sum(above.to(tl.int32), 1)
    chosen = above | ((tie > 0) & (tie_rank < room[:, None]))
    chosen_i = chosen.to(tl.int32)
    slot = row_cumsum(chosen_i, 1) - chosen_i
    n_chosen = row_sum(chosen_i, 1)
    out = idx_ptr + hk * stride_ih + rr.to(tl.int64) * stride_ir
    blocks = tl.full([BR, NBP], 0, tl.int32) + bb[None, :]
    tl.store(out[:, None] + slot, blocks, mask=chosen & r_ok[:, None])
    kk = tl.arange(0, KP)
    pad = r_ok[:, None] & (kk[None, :] < K) & (kk[None, :] >= n_chosen[:, None])
    tl.store(out[:, None] + kk[None, :], tl.full([BR, KP], -1, tl.int32), mask=pad)


def select_rows(
    scores: torch.Tensor,
    tail: torch.Tensor | None,
    score_row_base: int,
    block_idx: torch.Tensor,
    layout: DocLayout,
    params: SparseParams,
    row_lo: int,
    row_hi: int,
    dense: DenseRows | None,
) -> None:
    """Fill block_idx [HKV, R, K] rows [row_lo, row_hi) from scores [HKV, rows - score_row_base, NBM].

    `tail` (same shape, or None) holds the scoring kernel's second half: the block score is max(scores[b], tail[b-1]).

    With `dense`, the dense rows get an empty list (their scores are never read); None selects for every row.
    """
    if row_hi <= row_lo:
        return
    kv_heads, _, num_blocks = scores.shape
    nbp = next_pow2(num_blocks)
    rows_per_prog = max(1, 4096 // nbp)
    grid = (triton.cdiv(row_hi - row_lo, rows_per_prog), kv_heads)
    # a list never holds more than the num_blocks blocks there are: K past that selects every block, so the
    # kernel works on min(K, num_blocks) slots; slots beyond stay -1 (block_idx comes -1-filled then)
    k = min(params.num_selected, num_blocks, block_idx.shape[-1])
    dense_args = (dense or DenseRows.build(layout, 0)).kernel_args()
    _select_kernel[grid](
        score_ptr=scores, tail_ptr=scores if tail is None else tail, idx_ptr=block_idx, row_pos_ptr=layout.row_pos,
        row_lo=row_lo, row_hi=row_hi, score_row_base=score_row_base, num_blocks=num_blocks,
        stride_sh=scores.stride(0), stride_sr=scores.stride(1),
        stride_ih=block_idx.stride(0), stride_ir=block_idx.stride(1), **dense_args,
        BS=params.block_size, INIT=params.init_blocks, WIN=params.window_size, K=k, KP=next_pow2(k),
        NBP=nbp, BR=rows_per_prog, SKIP_DENSE=dense is not None, HAS_TAIL=tail is not None,
        BLOCK_LOCAL=params.local_blocks == "block",
        num_warps=4 if rows_per_prog * nbp <= 2048 else (8 if nbp <= 8192 else 16),
    )


def infllmv2_select(
    block_scores: torch.Tensor,
    *,
    seqlen_k: int | None = None,
    block_size: int = 64,
    init_blocks: int = 1,
    topk: int = 64,
    window_size: int = 2048,
    cu_seqlens: torch.Tensor | None = None,
    local_blocks: str = "token",
    backend: str = "auto",
) -> torch.Tensor:
    """block_scores [B, HKV, Tq, NBM] -> visible blocks [B, HKV, Tq, K] int32 (ascending, -1 padded).

    K = topk + window_size // block_size; the queries are the last Tq of seqlen_k (default Tq) positions;
    local_blocks: which blocks are forced as the local window ("token" or "block", see naive.py).
    """
    batch, kv_heads, seqlen_q, num_blocks = block_scores.shape
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    kwargs = dict(block_size=block_size, init_blocks=init_blocks, topk=topk, window_size=window_size,
                  local_blocks=local_blocks)
    params = SparseParams(**kwargs)  # checks the settings for either backend, before the device
    if resolve_backend(backend, block_scores) == "torch":
        return infllmv2_select_torch(block_scores, seqlen_k=seqlen_k, cu_seqlens=cu_seqlens, **kwargs)
    layout = DocLayout.from_shape(batch, seqlen_q, seqlen_k, block_scores.device, cu_seqlens)
    if num_blocks < layout.max_blocks(block_size):
        raise ValueError(f"block_scores has {num_blocks} blocks, the sequence needs {layout.max_blocks(block_size)}")
    scores = block_scores.float().permute(1, 0, 2, 3).reshape(kv_heads, batch * seqlen_q, num_blocks)
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if params.num_selected > num_blocks:  # the slots past the blocks that exist stay -1
        out = torch.full((kv_heads, batch * seqlen_q, params.num_selected), -1, dtype=torch.int32,
                         device=block_scores.device)
    else:
        out = new_empty((kv_heads, batch * seqlen_q, params.num_selected), torch.int32, block_scores.device)
    select_rows(scores, None, 0, out, layout, params, 0, batch * seqlen_q, dense=None)
    return out.view(kv_heads, batch, seqlen_q, -1).permute(1, 0, 2, 3)
