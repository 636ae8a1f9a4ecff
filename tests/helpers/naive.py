"""Obviously-right, slow references written independently of the PyTorch references in salatrain_kernels
(``naive.py`` of each op, which the model also runs): closed forms, Python loops, explicit logits. Kernel
benchmarks import them too, so tests and benchmarks measure against the same thing."""

from __future__ import annotations

import math

import torch


def lightning_naive(q, k, v, decay, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    compute_dtype=None):
    """Lightning attention in closed form, quadratic per document: o = scale · ((Q Kᵀ) ⊙ λ^(t−s) [s ≤ t]) V +
    scale · λ^(t+1) Q S0; final state Σ_s λ^(T−1−s) k_s v_sᵀ + λ^T S0. q, k, v [B, T, H, D]; decay [H];
    initial_state [N, H, D, D] or None. Computes in fp32 (fp64 for fp64 inputs), or in ``compute_dtype`` to
    measure what plain PyTorch loses in low precision. Returns (o like q, final [N, H, D, D] or None)."""
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got {q.shape[0]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = decay.detach().to(torch.float64 if compute_dtype == torch.float64 else torch.float32)
    outs, finals = [], []
    docs = zip(_lightning_docs(q, cu_seqlens), _lightning_docs(k, cu_seqlens), _lightning_docs(v, cu_seqlens))
    for n, (qn, kn, vn) in enumerate(docs):
        h0 = None if initial_state is None else initial_state[n].to(compute_dtype)
        o, final = _lightning_doc(qn.to(compute_dtype), kn.to(compute_dtype), vn.to(compute_dtype), s, scale, h0)
        outs.append(o.to(q.dtype))
        finals.append(final.float() if compute_dtype != torch.float64 else final)
    o = torch.stack(outs, 0) if cu_seqlens is None else torch.cat(outs, 0).unsqueeze(0)
    return o, (torch.stack(finals, 0) if output_final_state else None)


def _lightning_docs(x, cu_seqlens):
    """Split [B, T, ...] into per-document [T_n, ...] views (B docs, or the cu_seqlens docs of batch 0)."""
    if cu_seqlens is None:
        return [x[b] for b in range(x.shape[0])]
    bounds = cu_seqlens.tolist()
    return [x[0, bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def _lightning_doc(q, k, v, s, scale, h0):
    """One document. q, k, v [T, H, D]; s [H]; h0 [H, D, D] or None -> (o [T, H, D], final [H, D, D])."""
    t_len = q.shape[0]
    t = torch.arange(t_len, device=q.device)
    dist = (t[:, None] - t[None, :]).to(s.dtype)
    mask = torch.exp(-s[:, None, None] * dist.clamp(min=0)) * (dist >= 0)
    scores = torch.einsum("thd,shd->hts", q, k) * mask.to(q.dtype)
    o = torch.einsum("hts,shd->thd", scores, v)
    tail = torch.exp(-s[None, :] * (t_len - 1 - t[:, None]).to(s.dtype)).to(q.dtype)  # [T, H]
    final = torch.einsum("thk,thv->hkv", k * tail[..., None], v)
    if h0 is not None:
        head = torch.exp(-s[None, :] * (t[:, None] + 1).to(s.dtype)).to(q.dtype)
        o = o + torch.einsum("thk,hkv->thv", q * head[..., None], h0)
        final = final + torch.exp(-s * t_len).to(q.dtype)[:, None, None] * h0
    return o * scale, final


def infllmv2_naive(q, k, v, *, block_size, kernel_size, kernel_stride, init_blocks, topk, window_size, dense_len,
                   normalizer="exact", dense_len_mode="position", local_blocks="token"):
    """InfLLM-V2 by the letter of DESIGN §2, one query and one group at a time. q [Tq, HQ, D], k/v [Tk, HKV, D]
    (a single document; the queries are its last Tq positions). Returns [Tq, HQ, D].

    DESIGN §5's released variants: ``normalizer="coarse"`` divides each window's exp(logit) by the sum over the
    finished windows of a 4× coarser compression (all scores 0 before the first one finishes);
    ``dense_len_mode="sequence"`` makes every query sparse once the keys number dense_len (none before);
    ``local_blocks="block"`` forces the query's block and the window_size/block_size blocks before it."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)

    def compress(size, stride):
        n = (tk - size) // stride + 1 if tk >= size else 0
        return [(j * stride + size - 1, k[j * stride: j * stride + size].mean(0)) for j in range(n)]

    k_cmp = compress(kernel_size, kernel_stride)
    k_coarse = compress(4 * kernel_size, 4 * kernel_stride)
    num_blocks = math.ceil(tk / block_size)
    out = torch.zeros_like(q)
    for i in range(tq):
        t = tk - tq + i
        dense = tk < dense_len if dense_len_mode == "sequence" else t < dense_len
        for grp in range(hkv):
            if dense:
                keys = list(range(t + 1))
            else:
                done = [j for j, (end, _) in enumerate(k_cmp) if end <= t]
                window_score = {j: 0.0 for j in done}
                for h in range(grp * g, (grp + 1) * g):
                    logits = torch.tensor([float(q[i, h] @ k_cmp[j][1][grp]) * scale for j in done])
                    if normalizer == "coarse":
                        coarse = [float(q[i, h] @ kc[grp]) * scale for end, kc in k_coarse if end <= t]
                        norm = math.log(sum(math.exp(x) for x in coarse)) if coarse else math.inf
                        probs = torch.exp(logits - norm)
                    else:
                        probs = torch.softmax(logits, 0) if done else logits
                    for j, p in zip(done, probs.tolist()):
                        window_score[j] += p
                scores = []
                for b in range(num_blocks):
                    lo, hi = b * block_size, (b + 1) * block_size - 1
                    over = [window_score[j] for j in done
                            if j * kernel_stride <= hi and k_cmp[j][0] >= lo]
                    sc = max(over) if over else -math.inf
                    if local_blocks == "block":
                        local = t // block_size - window_size // block_size <= b <= t // block_size
                    else:
                        local = lo <= t and hi >= max(0, t - window_size + 1)
                    if b < init_blocks or local:
                        sc = math.inf
                    if lo > t:
                        sc = -math.inf
                    scores.append((sc, b))
                budget = topk + window_size // block_size
                ranked = sorted(scores, key=lambda x: (-x[0], x[1]))[:budget]
                visible = {b for _, b in ranked if b * block_size <= t}
                keys = [j for j in range(t + 1) if j // block_size in visible]
            for h in range(grp * g, (grp + 1) * g):
                att = torch.softmax(torch.stack([q[i, h] @ k[j, grp] for j in keys]) * scale, 0)
                out[i, h] = sum(a * v[j, grp] for a, j in zip(att, keys))
    return out


def infllmv2_block_attn_naive(q, k, v, block_idx, *, block_size=64, scale=None, cu_seqlens=None, dense_len=0,
                              upcast=True):
    """Attention of each query over its listed blocks (block_idx [B, HKV, Tq, K], -1 = unused), causal, per
    document with explicit logits. Queries at position < dense_len attend to every key <= t; a query with no
    visible key gives 0. ``upcast=False`` keeps the matmuls in the input dtype: the "PyTorch in low
    precision" side of the tolerance rule. Memory O(HQ · Tq · Tk) per document."""
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


def _doc_slices(batch: int, seqlen_q: int, seqlen_k: int, cu_seqlens):
    """Yield (batch index, query slice, key slice, position of the first query) for every document."""
    if cu_seqlens is None:
        for b in range(batch):
            yield b, slice(0, seqlen_q), slice(0, seqlen_k), seqlen_k - seqlen_q
        return
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        yield 0, slice(start, end), slice(start, end), 0


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


# ------------------------------------------------------------------------------------------------------ checks
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
    local_blocks: str = "token",
) -> torch.Tensor:
    """How well block_idx [B, HKV, Tq, K] is a top-K of block_scores [B, HKV, Tq, NBM] (after forcing) per row.
    local_blocks="block" forces the query's block and the window_size // block_size blocks before it.

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
        if local_blocks == "block":
            first_local = torch.clamp(pos // block_size - window_size // block_size, min=0)[:, None]
        else:
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


def softmax_attention_naive(q, k, v, scale, window=None, left_pad=None):
    """Causal softmax attention of the last Tq of Tk positions, from an explicit visibility rule: query i (key
    position p = Tk − Tq + i) sees key j iff j ≤ p, j > p − window (with a window) and j ≥ left_pad[b].
    q [B, Tq, HQ, D], k/v [B, Tk, HKV, D] (GQA: query head h reads KV head h // (HQ / HKV)). Rows that see no
    key are left zero. Returns [B, Tq, HQ, D] in q's dtype, computed in fp64."""
    b, tq, hq, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for row in range(b):
        pad = 0 if left_pad is None else int(left_pad[row])
        for i in range(tq):
            p = tk - tq + i
            keys = [j for j in range(tk) if j <= p and j >= pad and (window is None or j > p - window)]
            if not keys:
                continue
            for h in range(hq):
                g = h // (hq // hkv)
                kk, vv = k[row, keys, g].double(), v[row, keys, g].double()
                att = torch.softmax(kk @ q[row, i, h].double() * scale, 0)
                out[row, i, h] = att @ vv
    return out.to(q.dtype)
