"""InfLLM-V2 sparse attention in pure PyTorch (the CPU path and the model's reference).

Legend: B batch, Tq queries (the last Tq of Tk keys), HQ query heads, HKV key/value heads, G = HQ/HKV,
D head dim, J compressed windows, NB blocks. Positions count from the start of the document.

A query at position t < dense_len attends densely. Otherwise (selection is shared by the G heads of a group):
  1. compressed keys: mean of K over windows [j·stride, j·stride + kernel) inside the document;
  2. p_h(j) = softmax_j(scale · q·k_cmp[j]) over windows ending at or before t, summed over the group;
  3. block score = max over those windows overlapping the block (−inf if none);
  4. init blocks and blocks holding one of the last window_size tokens score +inf, future blocks −inf;
     the first topk + window_size/block_size blocks by (score desc, index asc) are visible, future ones dropped;
  5. exact softmax attention over the visible blocks (causal inside the current block).
Selection is not differentiated; gradients flow through step 5. Imports torch only.

Two rules have a second form, MiniCPM-SALA's released one (DESIGN §5):
  dense_len_mode  "position": a query at position t is sparse iff t >= dense_len (prefill = decoding);
                  "sequence": every query of a sequence is sparse iff its keys so far number >= dense_len
  local_blocks    "token": the blocks holding the last window_size tokens up to t are forced visible;
                  "block": the query's block and the window_size/block_size blocks before it
"""

from __future__ import annotations

import math

import torch


def infllmv2_attn_torch(
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
    dense_len_mode: str = "position",
    local_blocks: str = "token",
) -> torch.Tensor:
    """q [B, Tq, HQ, D]; k, v [B, Tk, HKV, D] with Tq <= Tk. Returns o [B, Tq, HQ, D] in q's dtype."""
    check_rules(dense_len_mode, local_blocks)
    params = dict(
        block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride, init_blocks=init_blocks,
        topk=topk, window_size=window_size, dense_len=dense_len, normalizer=normalizer,
        dense_len_mode=dense_len_mode, local_blocks=local_blocks,
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        return _attend_one(q, k, v, scale, **params)
    if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
        raise ValueError("cu_seqlens requires batch size 1 and as many queries as keys")
    bounds = cu_seqlens.tolist()
    outs = [
        _attend_one(q[:, s:e], k[:, s:e], v[:, s:e], scale, **params) for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1)


# Query rows per step × keys × query heads: bounds the masks and attention weights of the reference, so long
# contexts run in O(T) extra memory per step instead of O(T²).
ROW_BUDGET = 1 << 24


def _attend_one(q, k, v, scale, *, dense_len, dense_len_mode, normalizer, kernel_size, kernel_stride, **select):
    """One document: q are its last Tq positions, k/v all Tk. Processes query rows in chunks."""
    tq, tk = q.shape[1], k.shape[1]
    pos = torch.arange(tk - tq, tk, device=q.device)
    keys = torch.arange(tk, device=q.device)
    is_sparse = sparse_queries(pos, tk, dense_len, dense_len_mode)
    cmp = None
    if bool(is_sparse.any()):
        cmp = compressed_keys(k, kernel_size, kernel_stride, normalizer)
    rows = max(1, ROW_BUDGET // (tk * q.shape[2]))
    out = []
    for a in range(0, tq, rows):
        p, qc = pos[a : a + rows], q[:, a : a + rows]
        visible = (p.view(-1, 1) >= keys.view(1, -1)).view(1, 1, len(p), tk).expand(q.shape[0], k.shape[2], -1, -1)
        sparse = is_sparse[a : a + rows]
        if cmp is not None and bool(sparse.any()):
            visible = visible.clone()
            visible[:, :, sparse] = sparse_key_mask(qc[:, sparse], tk, p[sparse], cmp, scale=scale, **select)
        out.append(masked_attention(qc, k, v, visible, scale))
    return torch.cat(out, dim=1)


def masked_attention(q, k, v, visible, scale):
    """Softmax attention with a boolean mask shared by each GQA group. visible [B, HKV, Tq, Tk]."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.view(b, tq, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, HKV, G, Tq, D]
    kk, vv = k.permute(0, 2, 1, 3).unsqueeze(2), v.permute(0, 2, 1, 3).unsqueeze(2)  # [B, HKV, 1, Tk, D]
    o = torch.nn.functional.scaled_dot_product_attention(qg, kk, vv, attn_mask=visible.unsqueeze(2), scale=scale)
    return o.permute(0, 3, 1, 2, 4).reshape(b, tq, hq, d)


def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Mean of K over windows [j·stride, j·stride + kernel): k [B, Tk, HKV, D] → [B, HKV, J, D]."""
    if k.shape[1] < kernel_size:
        return k.new_zeros(k.shape[0], k.shape[2], 0, k.shape[3])
    win = k.float().unfold(1, kernel_size, kernel_stride)  # [B, J, HKV, D, kernel]
    return win.mean(-1).permute(0, 2, 1, 3)


def group_window_scores(q, k_cmp, pos, kernel_size, kernel_stride, scale, lse_from=None):
    """Σ over the group of softmax_j(scale·q·k_cmp[j]) over windows ending <= pos: [B, HKV, Tq, J] fp32.

    ``lse_from`` = (k_coarse, coarse_kernel, coarse_stride) replaces the exact normaliser by the log-sum-exp
    over a coarser compression (InfLLM-V2's approximation). Windows not yet complete are −inf.
    """
    b, tq, hq, d = q.shape
    hkv, nj = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    qg = q.float().view(b, tq, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, HKV, G, Tq, D]
    logits = torch.einsum("bhgtd,bhjd->bhgtj", qg, k_cmp) * scale
    ends = torch.arange(nj, device=q.device) * kernel_stride + kernel_size - 1
    done = ends.view(1, -1) <= pos.view(-1, 1)  # [Tq, J]
    logits = logits.masked_fill(~done, float("-inf"))
    if lse_from is None:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    else:
        k_coarse, ck, cs = lse_from
        coarse = torch.einsum("bhgtd,bhjd->bhgtj", qg, k_coarse) * scale
        cends = torch.arange(k_coarse.shape[2], device=q.device) * cs + ck - 1
        coarse = coarse.masked_fill(~(cends.view(1, -1) <= pos.view(-1, 1)), float("-inf"))
        lse = torch.logsumexp(coarse, dim=-1, keepdim=True)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # no coarse window yet: every p is 0
    probs = torch.exp(logits - lse).nan_to_num(0.0)  # rows with no finished window: all zero
    probs = probs.sum(2)
    return probs.masked_fill(~done, float("-inf"))


def block_scores_from_windows(win, num_blocks, block_size, kernel_size, kernel_stride):
    """Max over the windows overlapping each block: win [B, HKV, Tq, J] → [B, HKV, Tq, NB] (−inf if none)."""
    nj = win.shape[-1]
    out = win.new_full((*win.shape[:-1], num_blocks), float("-inf"))
    if nj == 0:
        return out
    starts = torch.arange(nj, device=win.device) * kernel_stride
    first = starts // block_size
    last = (starts + kernel_size - 1) // block_size
    for off in range(int((last - first).max()) + 1):
        blk = first + off
        ok = (blk <= last) & (blk < num_blocks)
        src = win.masked_fill(~ok, float("-inf"))
        out.scatter_reduce_(-1, blk.clamp(max=num_blocks - 1).expand_as(src), src, reduce="amax")
    return out


def select_blocks(scores, pos, *, block_size, init_blocks, topk, window_size, local_blocks="token"):
    """Visible-block indicator [B, HKV, Tq, NB] (bool) from block scores and query positions (DESIGN step 4)."""
    nb = scores.shape[-1]
    blk = torch.arange(nb, device=scores.device)
    first_local = first_local_block(pos, block_size, window_size, local_blocks).view(-1, 1)
    cur = (pos // block_size).view(-1, 1)
    forced = (blk.view(1, -1) < init_blocks) | ((blk >= first_local) & (blk <= cur))
    future = blk.view(1, -1) > cur
    scores = scores.masked_fill(forced, float("inf")).masked_fill(future, float("-inf"))
    budget = min(nb, topk + window_size // block_size)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :budget]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    return chosen & ~future


def compressed_keys(k, kernel_size, kernel_stride, normalizer):
    """(k_cmp, (k_coarse, kernel, stride) or None): what block scoring needs from the keys, computed once."""
    if normalizer not in ("exact", "coarse"):
        raise ValueError(f"normalizer must be 'exact' or 'coarse', got {normalizer!r}")
    k_cmp = (compress_keys(k, kernel_size, kernel_stride), kernel_size, kernel_stride)
    if normalizer == "exact":
        return k_cmp, None
    ck, cs = 4 * kernel_size, 4 * kernel_stride  # InfLLM-V2's coarse normaliser: 128 / 64 for 32 / 16
    return k_cmp, (compress_keys(k, ck, cs), ck, cs)


def sparse_key_mask(q, tk, pos, compressed, *, block_size, init_blocks, topk, window_size, scale,
                    local_blocks="token"):
    """Key visibility [B, HKV, Tq, Tk] of queries q at document positions ``pos`` (all of them selecting blocks)."""
    (k_cmp, kernel_size, kernel_stride), lse_from = compressed
    win = group_window_scores(q, k_cmp, pos, kernel_size, kernel_stride, scale, lse_from)
    nb = math.ceil(tk / block_size)
    scores = block_scores_from_windows(win, nb, block_size, kernel_size, kernel_stride)
    blocks = select_blocks(scores, pos, block_size=block_size, init_blocks=init_blocks, topk=topk,
                           window_size=window_size, local_blocks=local_blocks)
    keys = blocks.repeat_interleave(block_size, dim=-1)[..., :tk]
    causal = pos.view(-1, 1) >= torch.arange(tk, device=q.device).view(1, -1)
    return keys & causal


# ---------------------------------------------------------------------------------------------------------------
# The two selection rules (salatrain's per-position / per-token forms and MiniCPM-SALA's released ones)
# ---------------------------------------------------------------------------------------------------------------

DENSE_LEN_MODES = ("position", "sequence")
LOCAL_BLOCK_RULES = ("token", "block")
DEFAULT_RULES = {"dense_len_mode": "position", "local_blocks": "token"}


def check_rules(dense_len_mode: str, local_blocks: str) -> None:
    if dense_len_mode not in DENSE_LEN_MODES:
        raise ValueError(f"dense_len_mode must be one of {', '.join(DENSE_LEN_MODES)}, got {dense_len_mode!r}")
    if local_blocks not in LOCAL_BLOCK_RULES:
        raise ValueError(f"local_blocks must be one of {', '.join(LOCAL_BLOCK_RULES)}, got {local_blocks!r}")


def sparse_queries(pos: torch.Tensor, num_keys: int, dense_len: int, dense_len_mode: str) -> torch.Tensor:
    """Which queries (document positions ``pos`` [Tq], ``num_keys`` keys so far) select blocks: bool [Tq].

    position: t >= dense_len, so a query's rule never depends on what follows it.
    sequence: all of them once the sequence holds dense_len keys (MiniCPM-SALA), none before; a query at
    t < dense_len is then dense while decoding and sparse in a prefill of dense_len tokens or more.
    """
    if dense_len_mode == "sequence":
        return torch.full_like(pos, num_keys >= dense_len, dtype=torch.bool)
    return pos >= dense_len


def dense_prefix_len(dense_len: int, dense_len_mode: str) -> int:
    """The longest fresh sequence (no cache) whose queries all attend densely."""
    return dense_len - 1 if dense_len_mode == "sequence" else dense_len


def first_local_block(pos: torch.Tensor, block_size: int, window_size: int, local_blocks: str) -> torch.Tensor:
    """First block forced visible as local context for queries at ``pos``; the local run ends at the query's block.

    token: the block holding token t - window_size + 1 (32 or 33 blocks for SALA's values);
    block: window_size / block_size blocks before the query's block (always 33 for SALA's values).
    """
    if local_blocks == "block":
        return (pos // block_size - window_size // block_size).clamp(min=0)
    return (pos - window_size + 1).clamp(min=0) // block_size
