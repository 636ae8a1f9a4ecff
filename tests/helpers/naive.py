"""Obviously-right, slow references written independently of the model's mixers (fp64, Python loops)."""

from __future__ import annotations

import math

import torch


def lightning_quadratic(q, k, v, s, scale):
    """o_t = scale · Σ_{j≤t} λ^{t-j} (q_t·k_j) v_j per head; q, k, v [B, T, H, D] fp64; s [H]."""
    t = q.shape[1]
    idx = torch.arange(t, dtype=q.dtype)
    diff = idx.view(-1, 1) - idx.view(1, -1)
    out = torch.zeros_like(v)
    for h in range(q.shape[2]):
        decay = torch.exp(-s[h] * diff) * (diff >= 0)
        scores = (q[:, :, h] @ k[:, :, h].transpose(1, 2)) * scale * decay
        out[:, :, h] = scores @ v[:, :, h]
    return out


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
