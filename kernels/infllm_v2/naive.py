"""Pure-PyTorch references for InfLLM-V2 sparse attention: fp32, per document, obviously right.

Same signatures as the Triton entry points (see ``__init__`` for the exact semantics). Memory is
O(HQ · Tq · Tk) per document: meant for tests and small CPU runs, not for long sequences.

Legend: q [B, Tq, HQ, D]; k, v [B, Tk, HKV, D]; G = HQ // HKV; the queries are the last Tq positions.
With ``cu_seqlens`` (int32 [N+1], B = 1, Tq = Tk) every document is processed on its own.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "compress_keys_naive",
    "infllmv2_block_scores_naive",
    "infllmv2_select_naive",
    "infllmv2_block_attn_naive",
    "infllmv2_attn_naive",
    "selection_margin",
]


def _doc_slices(batch: int, seqlen_q: int, seqlen_k: int, cu_seqlens):
    """Yield (batch index, query slice, key slice, position of the first query) for every document."""
    if cu_seqlens is None:
        for b in range(batch):
            yield b, slice(0, seqlen_q), slice(0, seqlen_k), seqlen_k - seqlen_q
        return
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield 0, slice(start, end), slice(start, end), 0


def compress_keys_naive(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Mean of k [L, HKV, D] over windows [j·stride, j·stride + kernel_size) inside L -> [nc, HKV, D] fp32."""
    length = k.shape[0]
    if length < kernel_size:
        return k.new_zeros(0, *k.shape[1:], dtype=torch.float32)
    return k.float().unfold(0, kernel_size, kernel_stride).mean(-1)


def _window_scores(q, kc, kernel_size, kernel_stride, pos, scale):
    """scale · q·kc for every (head, query, window) and the mask of windows ended by each query."""
    logits = torch.einsum("thd,jhd->htj", q.float(), kc) * scale  # kc already repeated per head
    ends = torch.arange(kc.shape[0], device=q.device) * kernel_stride + kernel_size - 1
    return logits, ends[None, :] <= pos[:, None]


def _doc_block_scores(q, k, pos, block_size, kernel_size, kernel_stride, scale, normalizer, coarse):
    """Block scores [HKV, Tq, nb] of one document (q [Tq, HQ, D], k [L, HKV, D], pos [Tq])."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    length = k.shape[0]
    num_blocks = -(-length // block_size)
    kc = compress_keys_naive(k, kernel_size, kernel_stride).repeat_interleave(group, dim=1)
    logits, seen = _window_scores(q, kc, kernel_size, kernel_stride, pos, scale)
    masked = logits.masked_fill(~seen, -math.inf)
    if normalizer == "exact":
        lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    else:
        kc2 = compress_keys_naive(k, *coarse).repeat_interleave(group, dim=1)
        logits2, seen2 = _window_scores(q, kc2, *coarse, pos, scale)
        lse = torch.logsumexp(logits2.masked_fill(~seen2, -math.inf), dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, math.inf))  # no window: p = 0
    prob = torch.exp(masked - lse).masked_fill(~seen, 0.0)
    group_prob = prob.view(kv_heads, group, *prob.shape[1:]).sum(1)  # [HKV, Tq, nc]
    starts = torch.arange(kc.shape[0], device=q.device) * kernel_stride
    blocks = torch.arange(num_blocks, device=q.device)
    overlap = (starts[None, :] < (blocks[:, None] + 1) * block_size) & (
        starts[None, :] + kernel_size - 1 >= blocks[:, None] * block_size
    )  # [nb, nc]
    usable = overlap[None, :, :] & seen[:, None, :]  # [Tq, nb, nc]
    candidates = group_prob[:, :, None, :].masked_fill(~usable[None], -math.inf)
    if candidates.shape[-1] == 0:
        return torch.full((kv_heads, q.shape[0], num_blocks), -math.inf, device=q.device)
    return candidates.amax(-1)


def infllmv2_block_scores_naive(
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
) -> torch.Tensor:
    """Block scores [B, HKV, Tq, NBM] fp32; NBM = blocks of the longest document, -inf past a document."""
    batch, seqlen_q, _, dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    coarse = (coarse_kernel_size or 4 * kernel_size, coarse_kernel_stride or 4 * kernel_stride)
    docs = list(_doc_slices(batch, seqlen_q, seqlen_k, cu_seqlens))
    max_blocks = max(-(-(ks.stop - ks.start) // block_size) for _, _, ks, _ in docs)
    out = torch.full((batch, kv_heads, seqlen_q, max_blocks), -math.inf, device=q.device)
    for b, qs, ks, pos0 in docs:
        pos = torch.arange(qs.stop - qs.start, device=q.device) + pos0
        scores = _doc_block_scores(
            q[b, qs], k[b, ks], pos, block_size, kernel_size, kernel_stride, scale, normalizer, coarse
        )
        out[b, :, qs, : scores.shape[-1]] = scores
    return out


def _doc_select(scores, pos, block_size, init_blocks, num_selected, window_size):
    """Visible blocks [HKV, Tq, K] of one document, ascending, -1 padded (scores [HKV, Tq, nb])."""
    num_blocks = scores.shape[-1]
    blocks = torch.arange(num_blocks, device=scores.device)
    current = (pos // block_size)[:, None]
    first_local = (torch.clamp(pos - window_size + 1, min=0) // block_size)[:, None]
    forced = (blocks[None, :] < init_blocks) | ((blocks[None, :] >= first_local) & (blocks[None, :] <= current))
    future = blocks[None, :] > current
    ranked = scores.masked_fill(forced[None], math.inf).masked_fill(future[None], -math.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :num_selected]
    order = order.masked_fill(order > current[None], num_blocks)  # drop future blocks
    order = torch.sort(order, dim=-1).values
    out = torch.full((*scores.shape[:2], num_selected), -1, dtype=torch.int32, device=scores.device)
    out[..., : order.shape[-1]] = torch.where(order == num_blocks, -1, order).int()
    return out


def infllmv2_select_naive(
    block_scores: torch.Tensor,
    *,
    seqlen_k: int | None = None,
    block_size: int = 64,
    init_blocks: int = 1,
    topk: int = 64,
    window_size: int = 2048,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """block_scores [B, HKV, Tq, NBM] -> visible block indices [B, HKV, Tq, K] int32, ascending, -1 padded.

    K = topk + window_size // block_size. ``seqlen_k`` (default Tq) places the queries: the last Tq positions.
    """
    batch, kv_heads, seqlen_q, _ = block_scores.shape
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    num_selected = topk + window_size // block_size
    out = torch.full((batch, kv_heads, seqlen_q, num_selected), -1, dtype=torch.int32, device=block_scores.device)
    for b, qs, ks, pos0 in _doc_slices(batch, seqlen_q, seqlen_k, cu_seqlens):
        num_blocks = -(-(ks.stop - ks.start) // block_size)
        pos = torch.arange(qs.stop - qs.start, device=block_scores.device) + pos0
        scores = block_scores[b, :, qs, :num_blocks].float()
        out[b, :, qs] = _doc_select(scores, pos, block_size, init_blocks, num_selected, window_size)
    return out


def _doc_attention(q, k, v, visible, scale, upcast):
    """Softmax attention of q [Tq, HQ, D] over k, v [L, HKV, D] where visible [HQ, Tq, L]; empty rows give 0."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    logits = torch.einsum("thd,shd->hts", q, k).float() * scale
    has_key = visible.any(-1, keepdim=True)
    logits = torch.where(has_key, logits.masked_fill(~visible, -math.inf), torch.zeros_like(logits))
    prob = torch.softmax(logits, dim=-1) * visible
    return torch.einsum("hts,shd->thd", prob.to(v.dtype), v)


def _doc_visible(block_idx, pos, length, block_size, dense_len, group):
    """Key visibility [HQ, Tq, L] from block lists [HKV, Tq, K] (dense rows: every key <= t)."""
    num_blocks = -(-length // block_size)
    chosen = torch.zeros(*block_idx.shape[:2], num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    slots = torch.where((block_idx < 0) | (block_idx >= num_blocks), num_blocks, block_idx).long()
    chosen.scatter_(-1, slots, True)
    keys = torch.arange(length, device=block_idx.device)
    in_block = chosen[..., keys // block_size]  # [HKV, Tq, L]
    causal = keys[None, :] <= pos[:, None]
    dense = (pos < dense_len)[:, None]
    visible = causal[None] & (in_block | dense[None])
    return visible.repeat_interleave(group, dim=0)


def infllmv2_block_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dense_len: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """Attention of each query over its listed blocks (block_idx [B, HKV, Tq, K], -1 = unused), causal.

    Queries at position < dense_len ignore their list and attend to every key <= t. ``upcast=False`` keeps
    the matmuls in the input dtype (the "PyTorch in low precision" side of the tolerance rule).
    """
    batch, seqlen_q, heads, dim = q.shape
    seqlen_k = k.shape[1]
    group = heads // k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    per_batch = [[] for _ in range(batch)]
    for b, qs, ks, pos0 in _doc_slices(batch, seqlen_q, seqlen_k, cu_seqlens):
        pos = torch.arange(qs.stop - qs.start, device=q.device) + pos0
        visible = _doc_visible(block_idx[b, :, qs], pos, ks.stop - ks.start, block_size, dense_len, group)
        per_batch[b].append(_doc_attention(q[b, qs], k[b, ks], v[b, ks], visible, scale, upcast))
    return torch.stack([torch.cat(pieces, dim=0) for pieces in per_batch]).to(q.dtype)


def infllmv2_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int = 64,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    init_blocks: int = 1,
    topk: int = 64,
    window_size: int = 2048,
    dense_len: int = 8192,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    normalizer: str = "exact",
    coarse_kernel_size: int | None = None,
    coarse_kernel_stride: int | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Full InfLLM-V2 attention: block scores -> selection (no gradient) -> attention over visible blocks."""
    seqlen_k = k.shape[1]
    longest = seqlen_k if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if longest <= dense_len:  # every query attends densely: nothing to select
        block_idx = torch.full((*k.shape[:1], k.shape[2], q.shape[1], 1), -1, dtype=torch.int32, device=q.device)
        return infllmv2_block_attn_naive(
            q, k, v, block_idx, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens, dense_len=dense_len,
            upcast=upcast,
        )
    with torch.no_grad():
        scores = infllmv2_block_scores_naive(
            q, k, block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride, scale=scale,
            cu_seqlens=cu_seqlens, normalizer=normalizer, coarse_kernel_size=coarse_kernel_size,
            coarse_kernel_stride=coarse_kernel_stride,
        )
        block_idx = infllmv2_select_naive(
            scores, seqlen_k=seqlen_k, block_size=block_size, init_blocks=init_blocks, topk=topk,
            window_size=window_size, cu_seqlens=cu_seqlens,
        )
    return infllmv2_block_attn_naive(
        q, k, v, block_idx, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens, dense_len=dense_len,
        upcast=upcast,
    )


def selection_margin(
    block_idx: torch.Tensor,
    block_scores: torch.Tensor,
    *,
    seqlen_k: int | None = None,
    block_size: int = 64,
    init_blocks: int = 1,
    topk: int = 64,
    window_size: int = 2048,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """How well block_idx [B, HKV, Tq, K] is a top-K of block_scores [B, HKV, Tq, NBM] (after forcing) per row.

    Returns [B, HKV, Tq] fp32: (lowest score chosen) - (highest score left out) among the past blocks; >= 0
    for an exact selection (+inf when every past block is visible), slightly negative when the selection was
    made from scores that differ from these by rounding, -inf when a forced block is missing, the count is
    wrong or an index repeats.
    """
    batch, kv_heads, seqlen_q, _ = block_scores.shape
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    num_selected = topk + window_size // block_size
    out = torch.empty(batch, kv_heads, seqlen_q, device=block_scores.device)
    for b, qs, ks, pos0 in _doc_slices(batch, seqlen_q, seqlen_k, cu_seqlens):
        num_blocks = -(-(ks.stop - ks.start) // block_size)
        pos = torch.arange(qs.stop - qs.start, device=block_scores.device) + pos0
        blocks = torch.arange(num_blocks, device=block_scores.device)
        current = (pos // block_size)[:, None]
        first_local = (torch.clamp(pos - window_size + 1, min=0) // block_size)[:, None]
        forced = (blocks < init_blocks) | ((blocks >= first_local) & (blocks <= current))
        past = blocks <= current  # [Tq, nb]
        ranked = block_scores[b, :, qs, :num_blocks].float().masked_fill(forced[None], math.inf)
        idx = block_idx[b, :, qs].long()
        chosen = torch.zeros(*idx.shape[:2], num_blocks + 1, dtype=torch.long, device=idx.device)
        chosen.scatter_add_(-1, torch.where(idx < 0, num_blocks, idx), torch.ones_like(idx))
        chosen = chosen[..., :num_blocks]
        lowest_in = ranked.masked_fill(chosen == 0, math.inf).amin(-1)
        highest_out = ranked.masked_fill((chosen > 0) | ~past[None], -math.inf).amax(-1)
        margin = lowest_in - highest_out
        margin = torch.where(torch.isnan(margin), torch.full_like(margin, math.inf), margin)  # inf - inf
        bad = (chosen > 1).any(-1) | (chosen > 0).logical_and(~past[None]).any(-1)
        bad |= chosen.sum(-1) != torch.clamp(current[:, 0] + 1, max=num_selected)[None]
        out[b, :, qs] = torch.where(bad, torch.full_like(margin, -math.inf), margin)
    return out
