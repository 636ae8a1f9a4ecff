"""Chunked Lightning attention in Triton: one scan kernel, run forward for the output and dq, and in reverse
time for dk and dv.

Every pass computes the same "decayed causal linear attention" on three inputs a, b, c of shape [T, D] per
(document, head) with a carried fp32 state X of shape [D, D]:

    forward  (rev=0):  out_i = sum_{j<=i} lam^(i-j) (a_i . b_j) c_j  +  lam^(i+1)   a_i X_in
    reverse  (rev=1):  out_i = sum_{j>=i} lam^(j-i) (a_i . b_j) c_j  +  lam^(T-1-i) a_i X_in

(positions counted inside the document) and X_out is the state after the last token, or, in reverse, the
state "before" the first one (lam times the gradient at t=0). Outputs are multiplied by ``scale``.

    pass      a    b    c    out   initial X            final X
    forward   q    k    v    o     S_init               S_T                   o  = scale * S_t^T q_t
    dq        do   v    k    dq    S_init^T             -                     dq = scale * S_t do_t
    dk        v    do   q    dk    dS_T^T / scale       -                     dk = dS_t v_t
    dv        k    q    do   dv    dS_T / scale         dS_init / scale       dv = dS_t^T k_t

(dS_t is the gradient w.r.t. the state S_t; dS_T comes from the final state's gradient.)

Each program owns one (document, head, BV-column tile of the output) and walks the document chunk by chunk
(BT = chunk_size tokens, 64 by default): it loads a, b [BT, D] and c [BT, BV], computes the chunk's masked
score matrix (a b^T) * lam^|i-j| on tensor cores, adds the inter-chunk term a X, and updates X in registers. Nothing of
size T x D x D is ever written to memory. The three backward passes run in one launch (grid axis 1), so
even batch 1 puts 3 * H * D/BV programs on the GPU. BV, warps and pipeline stages are autotuned per
(H, D, BT, dtype, number of sequences, number of passes).

Cost per pass and (token, head): 2*(BT*D + BT*BV) * D/BV + 4*D*D FLOPs (the score matrix is recomputed
for each of the D/BV column tiles); memory traffic is one read of a, b, c and one write of out (a and b
are shared through L2 by the column tiles of a head, which run side by side).

Numerics: bf16/fp16 inputs go through tensor-core dots with fp32 accumulation; the fp32 state and the
chunk's scores are rounded to the input dtype only as dot operands (as fla does), so with fp16 inputs a
state entry beyond 65504 would overflow. fp32 inputs use exact fp32 dots (no TF32): correct but slow and
meant for tests. Offsets are int64 where they scale with T, so T * H * D may exceed 2^31.
"""
from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ..utils import device_guard, interpreting, new_empty, next_pow2

MAX_TASKS = 3

if interpreting():
    _CONFIGS = [triton.Config({"BV": 32}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BV": bv}, num_warps=w, num_stages=s)
        for bv, w, s in ((32, 4, 2), (32, 4, 3), (32, 8, 2), (64, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2))
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that make sense for this head dim and dtype (fp32 tiles need twice the SRAM)."""
    bd = kwargs.get("BD", named_args.get("BD"))
    ieee = kwargs.get("IEEE", named_args.get("IEEE"))
    kept = []
    for cfg in configs:
        bv, w, s = cfg.kwargs["BV"], cfg.num_warps, cfg.num_stages
        if ieee or bd >= 256:  # fp32 (FMA dots, slow to compile) and D=256 (register-bound): one config
            if (bv, w, s) != (32, 8, 2):
                continue
        elif bv > bd and bv != 32:
            continue
        kept.append(cfg)
    return kept or configs[:1]


@triton.jit
def _mm(x, y, acc, IEEE: tl.constexpr):
    """x @ y + acc in fp32; exact fp32 products for fp32 inputs (no TF32)."""
    if IEEE:
        r = tl.dot(x, y, acc, input_precision="ieee")
    else:
        r = tl.dot(x, y, acc)
    return r


# Tuned results persist in Triton's cache directory where this Triton can (cache_results): every training
# stage is a new process, and each would otherwise re-benchmark every config for every key it meets.
_AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.autotune(
    configs=_CONFIGS,
    key=["H", "D", "BT", "IS_VARLEN", "IEEE", "N_HINT", "NTASK"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **_AUTOTUNE_CACHE,
)
@triton.jit(do_not_specialize=[
    "x0_sa", "x0_sc", "rev0", "use_in0", "use_out0", "x1_sa", "x1_sc", "rev1", "use_in1", "use_out1",
    "x2_sa", "x2_sc", "rev2", "use_in2", "use_out2", "scale", "T", "N_HINT", "NTASK",
])
def _scan_kernel(
    a0, b0, c0, o0, x0_in, x0_out, x0_sa, x0_sc, rev0, use_in0, use_out0,
    a1, b1, c1, o1, x1_in, x1_out, x1_sa, x1_sc, rev1, use_in1, use_out1,
    a2, b2, c2, o2, x2_in, x2_out, x2_sa, x2_sc, rev2, use_in2, use_out2,
    cu_seqlens, decay, scale, T,
    N_HINT, NTASK, H,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, IEEE: tl.constexpr,
):
    # axis 0 enumerates (sequence*head, column tile), tiles fastest: the tiles of a head run side by side
    # and share its a/b loads through L2 (axis 0 also has no 65535 limit, unlike axes 1 and 2)
    NV: tl.constexpr = (D + BV - 1) // BV
    i_v = tl.program_id(0) % NV
    i_nh = tl.program_id(0) // NV
    task = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H

    if task == 0:
        a, b, c, o, x_in, x_out, x_sa, x_sc, rev, use_in, use_out = \
            a0, b0, c0, o0, x0_in, x0_out, x0_sa, x0_sc, rev0, use_in0, use_out0
    elif task == 1:
        a, b, c, o, x_in, x_out, x_sa, x_sc, rev, use_in, use_out = \
            a1, b1, c1, o1, x1_in, x1_out, x1_sa, x1_sc, rev1, use_in1, use_out1
    else:
        a, b, c, o, x_in, x_out, x_sa, x_sc, rev, use_in, use_out = \
            a2, b2, c2, o2, x2_in, x2_out, x2_sa, x2_sc, rev2, use_in2, use_out2
    is_rev = rev != 0

    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    seq_len = (eos - bos).to(tl.int32)
    num_chunks = tl.cdiv(seq_len, BT)

    # log2 of the per-step decay: lam^n = exp2(-s2 * n)
    s2 = tl.load(decay + i_h).to(tl.float32) * 1.4426950408889634  # log2(e)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < D
    row_stride = H * D

    # intra-chunk decay mask lam^(i-j) for j <= i (forward) or lam^(j-i) for j >= i (reverse)
    dist = tl.where(is_rev, o_t[None, :] - o_t[:, None], o_t[:, None] - o_t[None, :])
    decay_mask = tl.where(dist >= 0, tl.exp2(-s2 * dist.to(tl.float32)), 0.0)

    state_off = i_nh.to(tl.int64) * D * D
    m_state = m_d[:, None] & m_v[None, :]
    x = tl.zeros([BD, BV], dtype=tl.float32)
    if use_in != 0:
        p_x = x_in + state_off + o_d[:, None] * x_sa + o_v[None, :] * x_sc
        x = tl.load(p_x, mask=m_state, other=0.0).to(tl.float32)

    for k in range(0, num_chunks):
        i_c = tl.where(is_rev, num_chunks - 1 - k, k)
        t0 = i_c * BT
        n_valid = tl.minimum(seq_len - t0, BT)
        m_t = o_t < n_valid
        base = (bos + t0) * row_stride + i_h * D
        p_ab = base + o_t[:, None] * row_stride + o_d[None, :]
        p_c = base + o_t[:, None] * row_stride + o_v[None, :]
        m_ab = m_t[:, None] & m_d[None, :]
        m_c = m_t[:, None] & m_v[None, :]
        b_a = tl.load(a + p_ab, mask=m_ab, other=0.0)
        b_b = tl.load(b + p_ab, mask=m_ab, other=0.0)
        b_c = tl.load(c + p_c, mask=m_c, other=0.0)

        # inter-chunk term with the carried state, decayed to each row
        e_a = tl.where(is_rev, n_valid - 1 - o_t, o_t + 1)
        d_a = tl.where(m_t, tl.exp2(-s2 * e_a.to(tl.float32)), 0.0)
        acc = _mm(b_a, x.to(b_a.dtype), tl.zeros([BT, BV], dtype=tl.float32), IEEE) * d_a[:, None]
        # intra-chunk term
        scores = _mm(b_a, tl.trans(b_b), tl.zeros([BT, BT], dtype=tl.float32), IEEE) * decay_mask
        acc = _mm(scores.to(b_c.dtype), b_c, acc, IEEE)
        tl.store(o + p_c, (acc * scale).to(o.dtype.element_ty), mask=m_c)

        # state update: X <- lam^n X + sum_j lam^(e_j) b_j c_j^T
        e_c = tl.where(is_rev, o_t + 1, n_valid - 1 - o_t)
        d_c = tl.where(m_t, tl.exp2(-s2 * e_c.to(tl.float32)), 0.0)
        c_dec = (b_c.to(tl.float32) * d_c[:, None]).to(b_b.dtype)
        x = _mm(tl.trans(b_b), c_dec, x * tl.exp2(-s2 * n_valid.to(tl.float32)), IEEE)

    if use_out != 0:
        p_out = x_out + state_off + o_d[:, None] * D + o_v[None, :]
        tl.store(p_out, x, mask=m_state)


class ScanTask:
    """One pass of the scan kernel: out = scan(a, b, c) with an optional initial and final state.

    ``x_in`` is read as x_in[n, h, i, j] at ``n*H*D*D + h*D*D + i*x_strides[0] + j*x_strides[1]`` (pass
    (1, D) to read a [N, H, D, D] tensor transposed); ``x_out`` is written contiguous.
    """

    def __init__(self, a, b, c, out, reverse=False, x_in=None, x_strides=None, x_out=None):
        self.a, self.b, self.c, self.out = a, b, c, out
        self.reverse = reverse
        self.x_in, self.x_out = x_in, x_out
        d = a.shape[-1]
        self.x_strides = x_strides if x_strides is not None else (d, 1)

    def args(self, i, dummy):
        """The scan kernel's arguments of task slot i (absent states point at `dummy`)."""
        return {
            f"a{i}": self.a, f"b{i}": self.b, f"c{i}": self.c, f"o{i}": self.out,
            f"x{i}_in": self.x_in if self.x_in is not None else dummy,
            f"x{i}_out": self.x_out if self.x_out is not None else dummy,
            f"x{i}_sa": self.x_strides[0], f"x{i}_sc": self.x_strides[1],
            f"rev{i}": int(self.reverse), f"use_in{i}": int(self.x_in is not None),
            f"use_out{i}": int(self.x_out is not None),
        }


def new_buffer(like, shape=None, dtype=None):
    """An output buffer on like's device (like's shape and dtype unless given); poisoned in tests."""
    return new_empty(like.shape if shape is None else shape, like.dtype if dtype is None else dtype, like.device)


def _seq_bucket(num_seqs: int) -> int:
    """The autotuning key's view of the number of sequences: 1, <= 4, <= 16, more. Packed batches vary in
    their document count from batch to batch; a key per power of two re-tuned (and benchmarked every config)
    each time a new count appeared, for no gain beyond these four regimes of grid size."""
    return 1 if num_seqs <= 1 else 4 if num_seqs <= 4 else 16 if num_seqs <= 16 else 64


def run_scan(tasks, decay, scale, num_seqs, cu_seqlens, chunk_size):
    """Launch 1..3 scan passes at once. Inputs [B, T, H, D] contiguous; num_seqs = B or len(cu_seqlens)-1;
    chunk_size tokens per chunk (a power of two >= 16)."""
    assert 1 <= len(tasks) <= MAX_TASKS
    a = tasks[0].a
    B, T, H, D = a.shape
    for t in tasks:
        for x in (t.a, t.b, t.c, t.out):
            assert x.shape == (B, T, H, D) and x.is_contiguous()
        if t.x_out is not None:
            assert t.x_out.dtype == torch.float32 and t.x_out.is_contiguous()
    BD = max(16, next_pow2(D))
    padded = list(tasks) + [tasks[0]] * (MAX_TASKS - len(tasks))
    dummy = torch.empty(1, dtype=torch.float32, device=a.device)  # stands in for absent states
    slots = {name: value for i, t in enumerate(padded) for name, value in t.args(i, dummy).items()}
    is_varlen = cu_seqlens is not None

    def grid(meta):
        return (triton.cdiv(D, meta["BV"]) * num_seqs * H, len(tasks))

    with device_guard(a):
        _scan_kernel[grid](
            **slots, cu_seqlens=cu_seqlens if is_varlen else decay, decay=decay, scale=float(scale), T=T,
            N_HINT=_seq_bucket(num_seqs), NTASK=len(tasks), H=H,
            D=D, BD=BD, BT=chunk_size, IS_VARLEN=is_varlen, IEEE=a.dtype == torch.float32,
        )


def lightning_fwd(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens, num_seqs, chunk_size):
    o = new_buffer(q)
    B, T, H, D = q.shape
    final = new_buffer(q, (num_seqs, H, D, D), torch.float32) if output_final_state else None
    run_scan([ScanTask(q, k, v, o, x_in=initial_state, x_out=final)], decay, scale, num_seqs, cu_seqlens, chunk_size)
    return o, final


def lightning_bwd(q, k, v, decay, scale, initial_state, do, d_final, cu_seqlens, num_seqs, chunk_size, needs):
    """Gradients (dq, dk, dv, d_initial_state); entries of ``needs`` that are False come back None."""
    need_dq, need_dk, need_dv, need_dh0 = needs
    need_dh0 = need_dh0 and initial_state is not None
    B, T, H, D = q.shape
    dq = new_buffer(q) if need_dq else None
    dk = new_buffer(k) if need_dk else None
    dv = new_buffer(v) if (need_dv or need_dh0) else None
    dh0 = new_buffer(q, (num_seqs, H, D, D), torch.float32) if need_dh0 else None
    g = None if d_final is None else (d_final.float() / scale).contiguous()
    tasks = []
    if need_dq:
        tasks.append(ScanTask(do, v, k, dq, x_in=initial_state, x_strides=(1, D)))
    if need_dk:
        tasks.append(ScanTask(v, do, q, dk, reverse=True, x_in=g, x_strides=(1, D)))
    if dv is not None:
        tasks.append(ScanTask(k, q, do, dv, reverse=True, x_in=g, x_out=dh0))
    if tasks:
        run_scan(tasks, decay, scale, num_seqs, cu_seqlens, chunk_size)
    if dh0 is not None:
        dh0.mul_(scale)
    return dq, dk, (dv if need_dv else None), dh0


class LightningAttnFunction(torch.autograd.Function):
    """Autograd wrapper; ``decay`` gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens, num_seqs, chunk_size):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        decay = decay.detach().float().contiguous()
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        o, final = lightning_fwd(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens, num_seqs,
                                 chunk_size)
        ctx.save_for_backward(q, k, v, decay, initial_state, cu_seqlens)
        ctx.scale, ctx.num_seqs, ctx.chunk_size = scale, num_seqs, chunk_size
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, decay, initial_state, cu_seqlens = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                 ctx.needs_input_grad[5])
        dq, dk, dv, dh0 = lightning_bwd(q, k, v, decay, ctx.scale, initial_state, do.to(q.dtype).contiguous(), d_final,
                                        cu_seqlens, ctx.num_seqs, ctx.chunk_size, needs)
        return dq, dk, dv, None, None, dh0, None, None, None, None
