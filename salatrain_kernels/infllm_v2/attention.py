"""Stage (c): attention over given blocks, forward and backward, plus the dense path (t < dense_len).

Rows at position t < dense_len ("dense rows"; under dense_len_mode="sequence" the rows of documents shorter
than dense_len) attend to every key <= t; the rest ("sparse rows") attend to the blocks listed for them in
block_idx, causal inside the current block. The work is split by job:

    window.py  local tile kernels (flash-attention style) for each row's contiguous key range: every key of a
               dense row, and the local window of a sparse row when the fused op hands it over
    gather.py  gather kernels walking each sparse row's block list, the G heads of a KV group per program
    plan.py    the launch plan: row chunks, tile tables, launch settings, forward and backward (autograd)

Softmax statistics are kept as log2-sum-exp2 of scale·q·k·log2(e) ("lse2", fp32 [R, HQ]); a row without
any visible key outputs 0 and gets lse2 = +inf (zero gradient).
"""
from __future__ import annotations

import torch

from ..utils import resolve_backend
from .layout import DocLayout
from .naive import check_rules
from .stages_torch import infllmv2_block_attn_torch
from .params import ATTENTION_RULE, check_qkv, triton_attention_ok
from .plan import AttnPlan, SparseAttnFn, sort_block_lists

__all__ = ["infllmv2_block_attn"]


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
    dense_len_mode: str = "position",
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of every query over the blocks listed for its KV group; differentiable in q, k, v.

    block_idx [B, HKV, Tq, K] int32: distinct block indices of the query's document, any order, -1 for
    unused slots. Keys after the query are masked (causal inside the current block). Dense queries (position
    < dense_len; under dense_len_mode="sequence" every query of a document shorter than dense_len) ignore their
    list and attend to every key <= t.
    """
    check_rules(dense_len_mode, "token")
    check_qkv(q, k, v, cu_seqlens)
    batch, seqlen_q, heads, dim = q.shape
    kv_heads = k.shape[2]
    if block_idx.shape[:3] != (batch, kv_heads, seqlen_q):
        raise ValueError(f"block_idx {tuple(block_idx.shape)} must be [B, HKV, Tq, K] = "
                         f"[{batch}, {kv_heads}, {seqlen_q}, K]")
    if resolve_backend(backend, q) == "torch":
        return infllmv2_block_attn_torch(
            q, k, v, block_idx, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens, dense_len=dense_len,
            dense_len_mode=dense_len_mode,
        )
    if not triton_attention_ok(block_size):
        raise ValueError(f"block_size={block_size}: the Triton InfLLM-V2 kernels need {ATTENTION_RULE} "
                         "(use backend='torch')")
    scale = dim**-0.5 if scale is None else scale
    layout = DocLayout.build(q, k, cu_seqlens)
    idx3 = sort_block_lists(block_idx.permute(1, 0, 2, 3).reshape(kv_heads, batch * seqlen_q, -1))
    plan = AttnPlan(layout, heads, kv_heads, dim, q.dtype, block_size, scale, dense_len, dense_len_mode=dense_len_mode)
    return SparseAttnFn.apply(q, k, v, idx3, plan)
