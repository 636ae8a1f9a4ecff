"""InfLLM-V2 sparse attention (trainable, dense-sparse switchable), Triton kernels + PyTorch references.

Shapes: q [B, Tq, HQ, D]; k, v [B, Tk, HKV, D] with Tq <= Tk: the queries are the LAST Tq positions (chunked
prefill, decoding). G = HQ / HKV query heads per KV group, any G >= 1. A query's position t counts from the
start of its document. With cu_seqlens (int32 [N+1], B = 1, Tq = Tk) every document is an independent
sequence: positions, blocks and windows restart at its start and nothing crosses a boundary.

Parameters (MiniCPM4 / SALA defaults): block_size B_s = 64, kernel_size = 32, kernel_stride = 16,
init_blocks = 1, topk = 64, window_size = 2048, dense_len = 8192, scale = None (-> D^-1/2),
normalizer = "exact" | "coarse" (coarse windows: kernel 4·kernel_size, stride 4·kernel_stride = 128 / 64).

A query at position t < dense_len attends densely (exact causal softmax over keys 0..t). For t >= dense_len:
  1. compressed keys: k_cmp[j] = mean of K over [j·stride, j·stride + kernel_size) for every j with
     j·stride + kernel_size <= document length; window j ends at e_j = j·stride + kernel_size − 1.
  2. per query head h: p_h(j) = softmax_j(scale · q_t·k_cmp[j]) over the windows with e_j <= t, and the
     group score g(j) = sum of p_h(j) over the heads of the group. normalizer="coarse" (InfLLM-V2's
     approximation) instead uses p_h(j) = exp(scale · q·k_cmp[j] − LSE_h), LSE_h the log-sum-exp over the
     coarse windows ending <= t (+inf when none has ended yet, so p = 0, as FlashAttention reports an
     empty row).
  3. block score bs(b) = max of g(j) over windows with e_j <= t overlapping block b (j·stride < (b+1)·B_s
     and e_j >= b·B_s); -inf if there is none.
  4. blocks b < init_blocks and every block holding one of the positions max(0, t − window_size + 1)..t
     score +inf; future blocks (b·B_s > t) -inf. Visible set = the first K = topk + window_size // B_s
     blocks of the document sorted by (score descending, block index ascending), future blocks dropped
     (past blocks scoring -inf may be taken while budget remains).
  5. output = exact softmax attention over the keys of the visible blocks, causal inside the current block.
Selection is not differentiated (indices are constants): gradients flow through step 5 only (dq, dk, dv).
When the visible set covers every block (t < K · B_s) the output equals dense causal attention. Heads of a
GQA group share the visible blocks. No RoPE is applied here.

Two rules have a second form, MiniCPM-SALA's released one (DESIGN §5), on every backend and stage that uses it:
  dense_len_mode = "position" (above) | "sequence": every query of a document whose keys number >= dense_len
                   selects blocks, none of a shorter one (a prefill and step-by-step decoding then differ);
  local_blocks   = "token" (step 4 above) | "block": the query's block and the window_size // B_s blocks before
                   it score +inf.

Public API (each has a pure-PyTorch reference of the same signature, ``*_torch`` in naive.py, which is what
backend="torch" runs and what the model runs without the kernels):
  infllmv2_attn(q, k, v, ...)                 the full op (interface.py)
  infllmv2_block_scores(q, k, ...)            (a) [B, HKV, Tq, NBM] fp32 block scores (score.py)
  infllmv2_select(block_scores, ...)          (b) [B, HKV, Tq, K] int32 visible blocks (selection.py)
  infllmv2_block_attn(q, k, v, block_idx, ...) (c) attention over given blocks + dense rows (attention.py:
                                              window.py, gather.py, shared.py, plan.py)
  triton_geometry_problem(block_size, kernel_size, kernel_stride)   None, or why the kernels cannot take it
How it runs (Triton; details in each module):
  scoring    one program = BQ queries x the G heads of a KV group (>= 128 rows): pass 1 log-sum-exp over the
             normaliser windows, pass 2 probabilities summed over the group and max-pooled into blocks; every
             window computed once (exact ties between neighbouring blocks survive); fp32 scores in row chunks.
  selection  per (query, group) row in registers: forcing, order-preserving integer keys, 32-step bitwise
             search of the K-th largest, ties to the lowest index, ascending compaction.
  rules      constexpr switches, so salatrain's default forms compile as before: BLOCK_LOCAL (the forced local
             window, in selection and in the local tile kernels' window), PER_ROW_DENSE (sequence rule with
             documents on both sides of dense_len: each document's threshold from a table; otherwise one scalar,
             0 for a long document).
  attention  the local window (and the dense prefix) through flash-style tiles of consecutive queries, the
             chosen blocks before the window gathered per (query, group) with the G heads as tl.dot rows; the
             two softmax parts merged through fp32 partials; with share_tokens = TQ > 1, TQ neighbouring
             queries walk the union of their lists together (each block loaded once, per-query bits mask it;
             shared.py); the gathered K/V blocks arrive by tensor descriptors (Hopper's bulk copies,
             kv_loads="tma", the default) or pointers. Backward: dq the same way; dk/dv of gathered blocks
             from a block -> queries map (torch.sort, on the device, no host synchronisation) with fp32 atomics.
             On CUDA, 16-bit padded batches send the dense prefix to torch SDPA (FlashAttention).
Decoding (one new query per row after a cache) has its own step, infllmv2_decode_torch: the same output as the
full op with no host synchronisation, a few dozen torch ops whatever the cache length; the model takes it for
one-token steps when the kernels do not run (CPU, backend 'torch', exported checkpoints without salatrain).
`python -m salatrain_kernels.infllm_v2.compile_check` compiles every kernel for sm_90 without a GPU.

Triton limits: the block geometry in params.py (block_size a power of two >= 16; kernel_stride divides
block_size with a power-of-two ratio, and kernel_size); any head dim (padded to a power of two >= 16) and any
G (padded to a power of two, >= 16 rows per tl.dot). backend="torch" accepts any parameters.

Attributes load lazily, so the references (naive.py) import without Triton.
"""

from .. import lazy_exports

_EXPORTS = {
    "infllmv2_attn": ".interface",
    "infllmv2_block_scores": ".score",
    "infllmv2_select": ".selection",
    "infllmv2_block_attn": ".attention",
    "triton_geometry_problem": ".params",
    "infllmv2_attn_torch": ".naive",
    "infllmv2_block_scores_torch": ".stages_torch",
    "infllmv2_select_torch": ".stages_torch",
    "infllmv2_block_attn_torch": ".stages_torch",
    "infllmv2_decode_torch": ".naive",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
