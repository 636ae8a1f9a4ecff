"""InfLLM-V2 sparse attention in pure PyTorch: the one reference of the op. Imports torch only.

Where it is used: backend="torch" of salatrain_kernels.infllm_v2 (the full op below has the signature of its
Triton twin; the three stages' references, stages_torch.py, are built from the steps here), the kernels'
self-test, and the model's sparse mixer when the kernels do not run, with a one-token decoding step of its own
(infllmv2_decode_torch: the full op for one query, with no host synchronisation). It lives in salatrain_kernels
because the kernels may not import application code while the model may import the kernels; ``save_pretrained``
copies this file next to the weights as ``sparse_attention.py`` (``copy_model_code`` in modeling_sala_hybrid.py),
which is where an exported checkpoint imports it from, so the export still needs only torch and transformers.
Keep it free of imports other than torch and the standard library.

Legend: B batch, Tq queries (the last Tq of Tk keys), HQ query heads, HKV key/value heads, G = HQ/HKV,
D head dim, J compressed windows, NB blocks. Positions count from the start of the document; with
cu_seqlens (int32 [N+1], B = 1, Tq = Tk) every document is processed on its own.

A query at position t < dense_len attends densely. Otherwise (selection is shared by the G heads of a group):
  1. compressed keys: mean of K over windows [j·stride, j·stride + kernel) inside the document;
  2. p_h(j) = softmax_j(scale · q·k_cmp[j]) over windows ending at or before t, summed over the group
     (normalizer="coarse": the normaliser is the log-sum-exp over coarser windows, 4x kernel and stride);
  3. block score = max over those windows overlapping the block (−inf if none);
  4. init blocks and blocks holding one of the last window_size tokens score +inf, future blocks −inf;
     the first topk + window_size/block_size blocks by (score desc, index asc) are visible, future ones dropped;
  5. exact softmax attention over the visible blocks (causal inside the current block).
Selection is not differentiated; gradients flow through step 5. Query rows are processed in chunks of
ROW_BUDGET // (Tk · HQ) rows, so masks, scores and attention weights take O(T) extra memory per step.
Attention runs in the inputs' dtype; block scores in fp32.

Two rules have a second form, MiniCPM-SALA's released one (DESIGN §5):
  dense_len_mode  "position": a query at position t is sparse iff t >= dense_len (prefill = decoding);
                  "sequence": every query of a document is sparse iff its keys so far number >= dense_len
  local_blocks    "token": the blocks holding the last window_size tokens up to t are forced visible;
                  "block": the query's block and the window_size/block_size blocks before it
"""

from __future__ import annotations

import contextlib
import math

import torch

# Query rows per step × keys × query heads: bounds the masks and attention weights of one step, so long
# contexts run in O(T) extra memory per step instead of O(T²).
ROW_BUDGET = 1 << 24


# ---------------------------------------------------------------------------------------------- entry points
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
    coarse_kernel_size: int | None = None,
    coarse_kernel_stride: int | None = None,
    dense_len_mode: str = "position",
    local_blocks: str = "token",
) -> torch.Tensor:
    """The full op. q [B, Tq, HQ, D]; k, v [B, Tk, HKV, D] with Tq <= Tk. Returns o [B, Tq, HQ, D] in q's dtype."""
    check_rules(dense_len_mode, local_blocks)
    scoring = dict(kernel_size=kernel_size, kernel_stride=kernel_stride, normalizer=normalizer,
                   coarse=(coarse_kernel_size, coarse_kernel_stride))
    selection = dict(block_size=block_size, init_blocks=init_blocks, topk=topk, window_size=window_size,
                     local_blocks=local_blocks)
    dense = (dense_len, dense_len_mode)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for qs, ks in _spans(q.shape[0], q.shape[1], k.shape[1], cu_seqlens):
        outs.append(_attend_document(q[:, qs], k[:, ks], v[:, ks], scale, dense, scoring, selection))
    return torch.cat(outs, dim=1)


def infllmv2_decode_torch(
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
    normalizer: str = "exact",
    coarse_kernel_size: int | None = None,
    coarse_kernel_stride: int | None = None,
    dense_len_mode: str = "position",
    local_blocks: str = "token",
) -> torch.Tensor:
    """One decoding step: q [B, 1, HQ, D] is the query at position Tk − 1 of every row, k, v [B, Tk, HKV, D] the
    cache with this token's key. The same output as ``infllmv2_attn_torch(q, k, v, ...)``, with no host
    synchronisation: what the full op reads back from the device is a Python int here (a decoding query is
    sparse or dense by its position alone, every window has ended by it, no block lies in its future, and it
    always sees keys), so on a GPU the host runs ahead of the kernels it launches. Returns [B, 1, HQ, D]."""
    check_rules(dense_len_mode, local_blocks)
    if q.shape[1] != 1:
        raise ValueError(f"infllmv2_decode_torch takes one query per row, got {q.shape[1]}")
    b, _, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    sparse = tk >= dense_len if dense_len_mode == "sequence" else tk - 1 >= dense_len
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    if not sparse or _num_blocks(tk, block_size) <= topk + window_size // block_size:
        # dense (by the rule, or every block visible): attention over the whole cache, the group's G heads as rows
        qg = q.transpose(1, 2).reshape(b, hkv, hq // hkv, d)
        with decode_sdpa_backends(q.device):
            o = torch.nn.functional.scaled_dot_product_attention(qg, kt, vt, scale=scale)
        return o.reshape(b, 1, hq, d).to(q.dtype)
    coarse = (coarse_kernel_size, coarse_kernel_stride)
    compressed = compressed_keys(k, kernel_size, kernel_stride, normalizer, coarse)  # complete windows only
    scores = block_scores(q, None, compressed, scale, _num_blocks(tk, block_size), block_size)
    selection = dict(block_size=block_size, init_blocks=init_blocks, topk=topk, window_size=window_size,
                     local_blocks=local_blocks)
    blocks = _decode_blocks(scores[:, :, 0], tk, **selection)
    if blocks is None:  # more forced blocks than places, so the query's own block may be left out: masks
        chosen = select_blocks(scores, torch.arange(tk - 1, tk, device=q.device), **selection)
        with decode_sdpa_backends(q.device):
            o = grouped_sdpa(q.transpose(1, 2), kt, vt, _keys_in_blocks(chosen, tk, block_size), scale)
        return o.reshape(b, 1, hq, d).to(q.dtype)
    # the keys of the chosen blocks, gathered: the last block is the query's own, so its keys past the cache end
    # are the tail of every row, cut off by one slice; then attention without a mask (FlashAttention on a GPU)
    # over those keys alone, not a masked pass over the whole cache
    kept = (blocks.shape[-1] - 1) * block_size + tk - (tk - 1) // block_size * block_size
    keys = (blocks.unsqueeze(-1) * block_size + torch.arange(block_size, device=q.device)).flatten(2)[..., :kept]
    index = keys.unsqueeze(-1).expand(-1, -1, -1, d)
    qg = q.transpose(1, 2).reshape(b, hkv, hq // hkv, d)
    with decode_sdpa_backends(q.device):
        o = torch.nn.functional.scaled_dot_product_attention(qg, kt.gather(2, index), vt.gather(2, index), scale=scale)
    return o.reshape(b, 1, hq, d).to(q.dtype)


def _decode_blocks(scores, tk, *, block_size, init_blocks, topk, window_size, local_blocks):
    """select_blocks for one decoding query at position tk − 1 whose cache has more blocks than it may see
    (scores [B, HKV, NB]): the same choice, as ascending block indices [B, HKV, topk + window_size / block_size]
    ending with the query's own block. No block lies in its future and the forced ones (init and local) are two
    ranges known on the host, so two fills replace the masks. None when the forced blocks outnumber the places
    (a configuration with few top-k places): select_blocks then keeps the lowest of them, not the query's own."""
    pos, nb = tk - 1, scores.shape[-1]
    cur = pos // block_size
    first_local = first_local_block(pos, block_size, window_size, local_blocks)
    budget = min(nb, topk + window_size // block_size)
    if len(set(range(min(init_blocks, nb))) | set(range(first_local, cur + 1))) > budget:
        return None
    scores = scores.clone()
    scores[..., :init_blocks] = float("inf")
    scores[..., first_local : cur + 1] = float("inf")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :budget]
    return torch.sort(order, dim=-1).values


def decode_sdpa_backends(device: torch.device):
    """The SDPA backends of a decoding step: all but cuDNN attention on CUDA. Every step has a new key length,
    and cuDNN attention (torch's default on an H200) builds an execution plan for each new shape: ~66 ms a call
    for one decoding query on an H200 against 0.1-0.6 ms for FlashAttention, memory-efficient or math attention
    (bench/sdpa_decode_shapes.py; bench/notes/2026-12-01-h200-sdpa-decode-shapes.log)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 (an exported checkpoint may meet one): its default dispatch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


# ---------------------------------------------------------------------------------------------- the full op
def _attend_document(q, k, v, scale, dense, scoring, selection):
    """One document (or a batch of equal-length rows): q its last Tq positions, k/v all Tk. Row chunks.
    dense = (dense_len, dense_len_mode)."""
    tq, tk = q.shape[1], k.shape[1]
    pos = _positions(tq, tk, q.device)
    block_size = selection["block_size"]
    is_sparse = sparse_queries(pos, tk, *dense)
    compressed = compressed_keys(k, **scoring) if bool(is_sparse.any()) else None
    out = []
    for rows in _row_chunks(tq, tk * q.shape[2]):
        p, qc = pos[rows], q[:, rows]
        visible = _causal(p, tk).view(1, 1, len(p), tk).expand(q.shape[0], k.shape[2], -1, -1)
        sparse = is_sparse[rows]
        if compressed is not None and bool(sparse.any()):
            ps = p[sparse]
            scores = block_scores(qc[:, sparse], ps, compressed, scale, _num_blocks(tk, block_size), block_size)
            chosen = select_blocks(scores, ps, **selection)
            visible = visible.clone()
            visible[:, :, sparse] = _keys_in_blocks(chosen, tk, block_size) & _causal(ps, tk)
        out.append(masked_attention(qc, k, v, visible, scale))
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------- steps 1-3: scoring
def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Mean of K over windows [j·stride, j·stride + kernel): k [B, Tk, HKV, D] → [B, HKV, J, D] fp32."""
    if k.shape[1] < kernel_size:
        return k.new_zeros(k.shape[0], k.shape[2], 0, k.shape[3], dtype=torch.float32)
    win = k.float().unfold(1, kernel_size, kernel_stride)  # [B, J, HKV, D, kernel]
    return win.mean(-1).permute(0, 2, 1, 3)


def compressed_keys(k, kernel_size, kernel_stride, normalizer, coarse=(None, None)):
    """((k_cmp, kernel, stride), (k_coarse, kernel, stride) or None): what scoring needs from the keys, once.
    The coarse normaliser's windows default to 4x kernel and stride (InfLLM-V2's 128 / 64 for 32 / 16)."""
    if normalizer not in ("exact", "coarse"):
        raise ValueError(f"normalizer must be 'exact' or 'coarse', got {normalizer!r}")
    k_cmp = (compress_keys(k, kernel_size, kernel_stride), kernel_size, kernel_stride)
    if normalizer == "exact":
        return k_cmp, None
    ck, cs = coarse[0] or 4 * kernel_size, coarse[1] or 4 * kernel_stride
    return k_cmp, (compress_keys(k, ck, cs), ck, cs)


def block_scores(q, pos, compressed, scale, num_blocks, block_size):
    """Block scores [B, HKV, Tq, NB] fp32 of queries q [B, Tq, HQ, D] at document positions pos [Tq] (None: past
    the end of every window, as a decoding query is)."""
    (k_cmp, kernel_size, kernel_stride), lse_from = compressed
    win = group_window_scores(q, k_cmp, pos, kernel_size, kernel_stride, scale, lse_from)
    return block_scores_from_windows(win, num_blocks, block_size, kernel_size, kernel_stride)


def group_window_scores(q, k_cmp, pos, kernel_size, kernel_stride, scale, lse_from=None):
    """Σ over the group of softmax_j(scale·q·k_cmp[j]) over windows ending <= pos: [B, HKV, Tq, J] fp32.

    ``lse_from`` = (k_coarse, coarse_kernel, coarse_stride) replaces the exact normaliser by the log-sum-exp
    over a coarser compression (InfLLM-V2's approximation). Windows not yet complete are −inf; pos None: every
    window has ended (a decoding query's), so no masks.
    """
    b, tq, hq, d = q.shape
    hkv, nj = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    qg = q.float().view(b, tq, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, HKV, G, Tq, D]
    logits = torch.einsum("bhgtd,bhjd->bhgtj", qg, k_cmp) * scale
    done = None if pos is None else _windows_ended(nj, kernel_size, kernel_stride, pos)  # [Tq, J]
    if done is not None:
        logits = logits.masked_fill(~done, float("-inf"))
    if lse_from is None:
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    else:
        k_coarse, ck, cs = lse_from
        coarse = torch.einsum("bhgtd,bhjd->bhgtj", qg, k_coarse) * scale
        if done is not None:
            coarse = coarse.masked_fill(~_windows_ended(k_coarse.shape[2], ck, cs, pos), float("-inf"))
        lse = torch.logsumexp(coarse, dim=-1, keepdim=True)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # no coarse window yet: every p is 0
    probs = torch.exp(logits - lse)
    if done is None:
        return probs.sum(2)
    probs = probs.nan_to_num(0.0).sum(2)  # rows with no finished window: all zero
    return probs.masked_fill(~done, float("-inf"))


def _windows_ended(num_windows, kernel_size, kernel_stride, pos):
    """[Tq, J]: window j (ending at j·stride + kernel − 1) has ended by each query position."""
    ends = torch.arange(num_windows, device=pos.device) * kernel_stride + kernel_size - 1
    return ends.view(1, -1) <= pos.view(-1, 1)


def block_scores_from_windows(win, num_blocks, block_size, kernel_size, kernel_stride):
    """Max over the windows overlapping each block: win [B, HKV, Tq, J] → [B, HKV, Tq, NB] (−inf if none)."""
    nj = win.shape[-1]
    if nj and block_size % kernel_stride == 0:
        # block i overlaps windows i·m − p … (i+1)·m − 1 (m = block / stride, p = (kernel − 1) // stride): one max
        # pool over the windows padded with −inf (p on the left, the blocks past the last window on the right)
        m, p = block_size // kernel_stride, (kernel_size - 1) // kernel_stride
        padded = torch.nn.functional.pad(win, (p, max(num_blocks * m - nj, 0)), value=float("-inf"))
        pooled = torch.nn.functional.max_pool1d(padded.reshape(-1, 1, padded.shape[-1]), m + p, m)
        return pooled.view(*win.shape[:-1], -1)[..., :num_blocks]
    out = win.new_full((*win.shape[:-1], num_blocks), float("-inf"))
    if nj == 0:
        return out
    starts = torch.arange(nj, device=win.device) * kernel_stride
    first = starts // block_size
    last = (starts + kernel_size - 1) // block_size
    # the most blocks past its first that a window reaches (starts fall on multiples of gcd(stride, block) within
    # a block): a host bound, so no device value is read back
    reach = (block_size - math.gcd(kernel_stride, block_size) + kernel_size - 1) // block_size
    for off in range(reach + 1):
        blk = first + off
        ok = (blk <= last) & (blk < num_blocks)
        src = win.masked_fill(~ok, float("-inf"))
        out.scatter_reduce_(-1, blk.clamp(max=num_blocks - 1).expand_as(src), src, reduce="amax")
    return out


# ------------------------------------------------------------------------------------ step 4: selection
def select_blocks(scores, pos, *, block_size, init_blocks, topk, window_size, local_blocks="token"):
    """Visible-block indicator [B, HKV, Tq, NB] (bool) from block scores and query positions (step 4)."""
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


# ------------------------------------------------------------------------------------ step 5: attention
def grouped_sdpa(q_BHRD, k_BHkvND, v_BHkvND, mask, scale):
    """Masked attention of [B, H, R, D] queries over [B, Hkv, N, D] keys (mask [B or 1, Hkv or 1, R, N] bool,
    shared by the heads of a group): the G = H / Hkv heads of a group go as G·R query rows over the group's own
    K/V, mask rows repeated, so K/V are never repeated per head (decoding reads the cache once per group, not once
    per head) and the 4-D call takes a fused backend that takes masks. Also the full-attention layers' masked path."""
    b, h, r, d = q_BHRD.shape
    hkv = k_BHkvND.shape[1]
    if h == hkv:
        return torch.nn.functional.scaled_dot_product_attention(q_BHRD, k_BHkvND, v_BHkvND, attn_mask=mask,
                                                                scale=scale)
    g = h // hkv
    o = torch.nn.functional.scaled_dot_product_attention(q_BHRD.reshape(b, hkv, g * r, d), k_BHkvND, v_BHkvND,
                                                         attn_mask=mask.repeat(1, 1, g, 1), scale=scale)
    return o.reshape(b, h, r, d)  # not view: CUDA's fused backends return [B, rows, H, D] memory under the shape


def masked_attention(q, k, v, visible, scale):
    """Softmax attention with a boolean mask shared by each GQA group (visible [B, HKV, Tq, Tk]), in q's dtype.
    A row without any visible key outputs 0."""
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    has_key = visible.any(-1, keepdim=True)
    empty_rows = not bool(has_key.all())
    if empty_rows:
        visible = visible | ~has_key  # attend anywhere, then zero the row
    o = grouped_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), visible, scale)  # [B, HQ, Tq, D]
    if empty_rows:
        o = (o.reshape(b, hkv, hq // hkv, tq, d) * has_key.unsqueeze(2)).reshape(b, hq, tq, d)
    return o.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------- the two forms of two rules
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
    sequence: all of them once the document holds dense_len keys (MiniCPM-SALA), none before; a query at
    t < dense_len is then dense while decoding and sparse in a prefill of dense_len tokens or more.
    """
    if dense_len_mode == "sequence":
        return torch.full_like(pos, num_keys >= dense_len, dtype=torch.bool)
    return pos >= dense_len


def dense_prefix_len(dense_len: int, dense_len_mode: str) -> int:
    """The longest fresh sequence (no cache) whose queries all attend densely."""
    return dense_len - 1 if dense_len_mode == "sequence" else dense_len


def all_visible_len(block_size: int, topk: int, window_size: int) -> int:
    """Queries at positions below this have at most K = topk + window_size // block_size blocks up to them, so all
    of them are visible whatever the scores and under either rule: their output is dense causal attention."""
    return (topk + window_size // block_size) * block_size


def first_local_block(pos, block_size: int, window_size: int, local_blocks: str):
    """First block forced visible as local context for queries at ``pos`` (a tensor, or an int: a decoding query's
    position, known on the host); the local run ends at the query's block.

    token: the block holding token t - window_size + 1 (32 or 33 blocks for SALA's values);
    block: window_size / block_size blocks before the query's block (always 33 for SALA's values).
    """
    def at_least_0(x):
        return x.clamp(min=0) if isinstance(x, torch.Tensor) else max(x, 0)

    if local_blocks == "block":
        return at_least_0(pos // block_size - window_size // block_size)
    return at_least_0(pos - window_size + 1) // block_size


# -------------------------------------------------------------------------------------------------- helpers
def _spans(batch: int, seqlen_q: int, seqlen_k: int, cu_seqlens) -> list[tuple[slice, slice]]:
    """(query slice, key slice) along the sequence of each document: the whole batch at once without
    cu_seqlens (the queries are the last seqlen_q of seqlen_k positions), else each cu_seqlens segment."""
    if cu_seqlens is None:
        return [(slice(0, seqlen_q), slice(0, seqlen_k))]
    if batch != 1 or seqlen_q != seqlen_k:
        raise ValueError("cu_seqlens requires batch size 1 and as many queries as keys")
    bounds = cu_seqlens.tolist()
    return [(slice(s, e), slice(s, e)) for s, e in zip(bounds[:-1], bounds[1:])]


def _positions(tq: int, tk: int, device) -> torch.Tensor:
    """Document positions of the last tq of tk keys."""
    return torch.arange(tk - tq, tk, device=device)


def _num_blocks(tk: int, block_size: int) -> int:
    return -(-tk // block_size)


def _row_chunks(tq: int, per_row: int) -> list[slice]:
    rows = max(1, ROW_BUDGET // max(1, per_row))
    return [slice(a, min(a + rows, tq)) for a in range(0, tq, rows)]


def _causal(pos: torch.Tensor, tk: int) -> torch.Tensor:
    """[Tq, Tk]: key j is at or before each query position."""
    return pos.view(-1, 1) >= torch.arange(tk, device=pos.device).view(1, -1)


def _keys_in_blocks(blocks: torch.Tensor, tk: int, block_size: int) -> torch.Tensor:
    """Block indicator [..., NB] → key indicator [..., Tk]."""
    return blocks.repeat_interleave(block_size, dim=-1)[..., :tk]
