"""infllmv2_attn: block scoring -> top-K selection (no gradient) -> attention over the visible blocks.

Scores are only computed for sparse queries (t >= dense_len), in chunks of query rows whose fp32 score
buffer stays under `score_budget_bytes` (HKV · rows · NBM · 4 bytes; 2 GiB for one 128K sequence in one go,
32 GiB at 512K), each chunk selected right away into the int32 block lists [HKV, R, K]. With FUSED_SELECT (off by
default; where selection.fused_select_ok) the scoring kernel selects as it scores and writes the lists itself, no
score leaving the chip: the same lists, with 0.2 instead of 1.1 GiB at 128K, but 5-12x slower than scoring and
then selecting (docs/perf.md, "Selection fused into the scoring kernel").
"""
from __future__ import annotations

import torch

from ..utils import resolve_backend
from .layout import DenseRows, DocLayout, dense_until
from .naive import infllmv2_attn_torch
from .params import SparseParams, check_qkv
from .plan import AttnPlan, SparseAttnFn, window_split_exact
from .score import BlockScorer
from .selection import fused_select_ok, select_rows
from .shared import SHARE_MAX_UNION

__all__ = ["infllmv2_attn", "select_blocks", "score_chunks", "dense_causal_sdpa", "dense_prefix_rows"]

SCORE_BUDGET_BYTES = 512 * 2**20
FUSED_SELECT = False  # score and select in one kernel where fused_select_ok (slower: docs/perf.md)


def score_chunks(q3, k3, layout: DocLayout, params: SparseParams, scale: float,
                 score_budget_bytes: int = SCORE_BUDGET_BYTES):
    """Score the sparse rows chunk by chunk; yields (own, tail or None, first row, end row) per chunk."""
    scorer = BlockScorer(q3, k3, layout, params, scale)
    sparse_from = dense_until(layout.length, params.dense_len, params.dense_len_mode)
    bytes_per_row = 4 * k3.shape[1] * scorer.num_blocks * (2 if scorer.kernel_ratio > 1 else 1)
    rows_per_chunk = max(scorer.rows_per_tile, score_budget_bytes // bytes_per_row)
    row0, nrows, docs = layout.tiles(scorer.rows_per_tile, sparse_from)
    for first, end, row_lo, row_hi in layout.tile_runs(scorer.rows_per_tile, sparse_from, rows_per_chunk):
        own, tail = scorer.new_buffers(row_hi - row_lo)
        scorer.run(own, tail, row_lo, (row0[first:end], nrows[first:end], docs[first:end]), write_all=False)
        yield own, (None if tail is own else tail), row_lo, row_hi


def select_blocks(q3, k3, layout: DocLayout, params: SparseParams, scale: float,
                  score_budget_bytes: int = SCORE_BUDGET_BYTES) -> torch.Tensor:
    """Visible blocks [HKV, R, K] int32 of every sparse query row (-1 elsewhere), ascending, -1 padded. K is
    min(topk + window / block_size, blocks of the longest document): a larger K would select every block."""
    k = min(params.num_selected, layout.max_blocks(params.block_size))
    block_idx = torch.full((k3.shape[1], layout.num_rows, k), -1, dtype=torch.int32, device=q3.device)
    if FUSED_SELECT and fused_select_ok(params, k, layout.max_blocks(params.block_size)):
        scorer = BlockScorer(q3, k3, layout, params, scale)
        sparse_from = dense_until(layout.length, params.dense_len, params.dense_len_mode)
        scorer.select(block_idx, layout.tiles(scorer.rows_per_tile, sparse_from))
        return block_idx
    dense = DenseRows.build(layout, params.dense_len, params.dense_len_mode)
    for own, tail, row_lo, row_hi in score_chunks(q3, k3, layout, params, scale, score_budget_bytes):
        select_rows(own, tail, row_lo, block_idx, layout, params, row_lo, row_hi, dense=dense)
    return block_idx


def infllmv2_attn(
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
    backend: str = "auto",
    coarse_kernel_size: int | None = None,
    coarse_kernel_stride: int | None = None,
    dense_len_mode: str = "position",
    local_blocks: str = "token",
    dense_prefix_sdpa: bool = True,
    share_tokens: int = 1,
    dq_mode: str = "gather",
    kv_loads: str = "tma",
    share_max_union: float = SHARE_MAX_UNION,
) -> torch.Tensor:
    """InfLLM-V2 sparse attention; o has q's shape and dtype. Semantics: see the package docstring.

    dense_len_mode, local_blocks: salatrain's forms of the two rules ("position", "token") or MiniCPM-SALA's
    released ones ("sequence", "block"); both backends take all four combinations.
    backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton", "torch".
    dense_prefix_sdpa: for 16-bit padded batches with Tq = Tk on CUDA, run the dense prefix (the rule's dense rows
    and the rows that see every block: dense_prefix_rows) through torch SDPA instead of the Triton dense kernel;
    fp32, varlen and Tq < Tk always use Triton.
    share_tokens: Triton only, 1, 2, 4, 8 or 16: > 1 lets that many neighbouring sparse queries share each
    gathered block (one load, per-query masks; exact, see shared.py); 1 gives every query its own (the default),
    except that with fewer than 16 query heads per K/V head as many neighbours as fill a 16-row tile share
    (plan.PACK_SMALL_GROUPS; not with dq_mode="atomic"). Tiles of at most 16 rows always share.
    share_max_union: with share_tokens > 1, a tile of neighbouring queries shares only when the union of its lists
    holds at most this fraction of their entries; the other tiles' queries take their own lists. 0.5 (the default)
    shares where lists overlap, 1.0 makes every tile share (exact either way; timed in docs/perf.md).
    dq_mode: Triton only: "gather" computes the sparse rows' dq over gathered blocks in a pass of its own per
    query; "atomic" adds it in the dk/dv pass over the blocks' query lists (fp32 atomics: one pass fewer, dq's
    last bits vary run to run, an fp32 buffer of q's size). With share_tokens > 1 dq keeps its own pass.
    kv_loads: Triton only: how the gathered-block kernels (forward and dq) load K/V blocks: "tma" (the default:
    tensor descriptors, Hopper's bulk tensor copies, where the GPU and K/V's layout allow them, pointers elsewhere;
    up to 4% faster fwd+bwd on an H200, 4-11% with share_tokens=4, docs/perf.md) or "pointer" (per-element addresses
    always). Same results either way.
    """
    check_qkv(q, k, v, cu_seqlens)
    params = SparseParams(
        block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride, init_blocks=init_blocks,
        topk=topk, window_size=window_size, dense_len=dense_len, normalizer=normalizer,
        coarse_kernel_size=coarse_kernel_size, coarse_kernel_stride=coarse_kernel_stride,
        dense_len_mode=dense_len_mode, local_blocks=local_blocks,
    )
    if resolve_backend(backend, q) == "torch":
        return infllmv2_attn_torch(
            q, k, v, block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride,
            init_blocks=init_blocks, topk=topk, window_size=window_size, dense_len=dense_len, scale=scale,
            cu_seqlens=cu_seqlens, normalizer=normalizer, coarse_kernel_size=coarse_kernel_size,
            coarse_kernel_stride=coarse_kernel_stride, dense_len_mode=dense_len_mode, local_blocks=local_blocks,
        )
    problem = params.geometry_problem()
    if problem:
        raise ValueError(f"{problem} (use backend='torch')")
    seqlen_q, dim = q.shape[1], q.shape[3]
    scale = dim**-0.5 if scale is None else scale
    prefix = min(dense_prefix_rows(k.shape[1], params), seqlen_q)
    options = dict(share_tokens=share_tokens, dq_mode=dq_mode, kv_loads=kv_loads, share_max_union=share_max_union)
    fast_dtype = q.dtype in (torch.float16, torch.bfloat16)
    if dense_prefix_sdpa and fast_dtype and cu_seqlens is None and seqlen_q == k.shape[1] and q.is_cuda and prefix > 0:
        # the dense rows see only keys before the first sparse row: the prefix is plain causal attention
        parts = [dense_causal_sdpa(q[:, :prefix], k[:, :prefix], v[:, :prefix], scale)]
        if prefix < seqlen_q:
            parts.append(_sparse(q[:, prefix:], k, v, None, params, scale, **options))
        return torch.cat(parts, dim=1)
    return _sparse(q, k, v, cu_seqlens, params, scale, **options)


def dense_prefix_rows(num_keys: int, params: SparseParams) -> int:
    """How many leading query rows of a fresh sequence of ``num_keys`` keys have dense causal attention as their
    output: those the rule makes dense (positions < dense_len; under the sequence rule all or none) and those
    that see every block anyway (positions < K · block_size, under either rule). The SDPA fast path takes them."""
    return max(dense_until([num_keys], params.dense_len, params.dense_len_mode)[0], params.all_visible_len)


def dense_causal_sdpa(q, k, v, scale):
    """Causal attention through torch SDPA on [B, H, T, D] views of the op's [B, T, H, D] tensors, K/V heads shared
    by ``enable_gqa``. Of the layouts timed on an H200 (bench/dense_prefix.py: repeated K/V, contiguous copies,
    either with enable_gqa) this one is the fastest at every length from 2K to 16K tokens, fwd+bwd."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _sparse(q, k, v, cu_seqlens, params: SparseParams, scale: float, **options):
    """The sparse rows (and any dense rows the SDPA prefix did not take) through the Triton kernels; options:
    share_tokens, dq_mode, kv_loads, share_max_union (AttnPlan)."""
    batch, seqlen_q, heads, dim = q.shape
    kv_heads = k.shape[2]
    layout = DocLayout.build(q, k, cu_seqlens)
    with torch.no_grad():
        q3 = q.detach().contiguous().view(batch * seqlen_q, heads, dim)
        k3 = k.detach().contiguous().view(-1, kv_heads, dim)
        block_idx = select_blocks(q3, k3, layout, params, scale)
    split = window_split_exact(params.init_blocks, params.topk, params.window_size, params.block_size,
                               params.local_blocks)
    plan = AttnPlan(layout, heads, kv_heads, dim, q.dtype, params.block_size, scale, params.dense_len,
                    local_window=params.window_size if split else 0, dense_len_mode=params.dense_len_mode,
                    local_blocks=params.local_blocks, **options)
    return SparseAttnFn.apply(q, k, v, block_idx, plan)
