"""The three stages of InfLLM-V2 in pure PyTorch, composed from naive.py's steps: the references (backend="torch")
of the Triton stage kernels score.py (a: block scores), selection.py (b: block lists) and attention.py (c: attention
over listed blocks), each with its twin's signature. The model does not use them (it runs the full op and the
decoding step of naive.py), so exported checkpoints do not carry this file. Imports torch only.
"""

from __future__ import annotations

import math

import torch

from .naive import (
    _causal,
    _keys_in_blocks,
    _num_blocks,
    _positions,
    _row_chunks,
    _spans,
    block_scores,
    check_rules,
    compressed_keys,
    masked_attention,
    select_blocks,
    sparse_queries,
)


def infllmv2_block_scores_torch(
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
    """Stage (a), steps 1-3: block scores [B, HKV, Tq, NBM] fp32; NBM = blocks of the longest document, −inf
    past a document's blocks and where no window has ended."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    spans = _spans(q.shape[0], q.shape[1], k.shape[1], cu_seqlens)
    max_blocks = max(_num_blocks(ks.stop - ks.start, block_size) for _, ks in spans)
    out = torch.full((q.shape[0], k.shape[2], q.shape[1], max_blocks), -math.inf, device=q.device)
    for qs, ks in spans:
        qd, kd = q[:, qs], k[:, ks]
        tk = kd.shape[1]
        pos = _positions(qd.shape[1], tk, q.device)
        coarse = (coarse_kernel_size, coarse_kernel_stride)
        compressed = compressed_keys(kd, kernel_size, kernel_stride, normalizer, coarse)
        nb = _num_blocks(tk, block_size)
        for rows in _row_chunks(qd.shape[1], tk * q.shape[2]):
            scores = block_scores(qd[:, rows], pos[rows], compressed, scale, nb, block_size)
            out[:, :, qs.start + rows.start : qs.start + rows.stop, :nb] = scores
    return out


def infllmv2_select_torch(
    block_scores: torch.Tensor,
    *,
    seqlen_k: int | None = None,
    block_size: int = 64,
    init_blocks: int = 1,
    topk: int = 64,
    window_size: int = 2048,
    cu_seqlens: torch.Tensor | None = None,
    local_blocks: str = "token",
) -> torch.Tensor:
    """Stage (b), step 4: block_scores [B, HKV, Tq, NBM] -> visible blocks [B, HKV, Tq, K] int32, ascending,
    −1 padded; K = topk + window_size // block_size. The queries are the last Tq of seqlen_k (default Tq)
    positions; local_blocks picks the form of the forced local window."""
    check_rules("position", local_blocks)
    batch, kv_heads, seqlen_q, _ = block_scores.shape
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    num_selected = topk + window_size // block_size
    out = torch.full((batch, kv_heads, seqlen_q, num_selected), -1, dtype=torch.int32, device=block_scores.device)
    for qs, ks in _spans(batch, seqlen_q, seqlen_k, cu_seqlens):
        tk = ks.stop - ks.start
        pos = _positions(qs.stop - qs.start, tk, block_scores.device)
        scores = block_scores[:, :, qs, : _num_blocks(tk, block_size)].float()
        chosen = select_blocks(scores, pos, block_size=block_size, init_blocks=init_blocks, topk=topk,
                               window_size=window_size, local_blocks=local_blocks)
        out[:, :, qs] = _block_lists(chosen, num_selected)
    return out


def infllmv2_block_attn_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dense_len: int = 0,
    dense_len_mode: str = "position",
) -> torch.Tensor:
    """Stage (c), step 5: attention of each query over the blocks listed for its group (block_idx [B, HKV, Tq,
    K], any order, −1 = unused), causal. Dense queries (position < dense_len; under dense_len_mode="sequence"
    every query of a document shorter than dense_len) ignore their list and attend to every key <= t; a query
    with no visible key outputs 0."""
    check_rules(dense_len_mode, "token")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for qs, ks in _spans(q.shape[0], q.shape[1], k.shape[1], cu_seqlens):
        qd, kd, vd, idx = q[:, qs], k[:, ks], v[:, ks], block_idx[:, :, qs]
        tk = kd.shape[1]
        pos = _positions(qd.shape[1], tk, q.device)
        nb = _num_blocks(tk, block_size)
        dense = ~sparse_queries(pos, tk, dense_len, dense_len_mode)
        for rows in _row_chunks(qd.shape[1], tk * q.shape[2]):
            p = pos[rows]
            listed = _keys_in_blocks(_block_mask(idx[:, :, rows], nb), tk, block_size)
            visible = _causal(p, tk) & (listed | dense[rows].view(-1, 1))
            outs.append(masked_attention(qd[:, rows], kd, vd, visible, scale))
    return torch.cat(outs, dim=1)


def _block_lists(chosen: torch.Tensor, num_selected: int) -> torch.Tensor:
    """Block indicator [..., NB] → ascending block indices [..., K] int32, −1 padded."""
    nb = chosen.shape[-1]
    idx = torch.where(chosen, torch.arange(nb, device=chosen.device), nb)
    idx = torch.sort(idx, dim=-1).values[..., :num_selected]
    lists = torch.where(idx == nb, -1, idx).int()
    if lists.shape[-1] < num_selected:
        lists = torch.nn.functional.pad(lists, (0, num_selected - lists.shape[-1]), value=-1)
    return lists


def _block_mask(block_idx: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Block lists [..., K] (−1 or out-of-range entries ignored) → indicator [..., NB] bool."""
    slots = torch.where((block_idx < 0) | (block_idx >= num_blocks), num_blocks, block_idx).long()
    chosen = torch.zeros(*block_idx.shape[:-1], num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    return chosen.scatter_(-1, slots, True)[..., :num_blocks]
