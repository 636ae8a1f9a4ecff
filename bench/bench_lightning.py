"""Lightning attention on the GPU: the core kernel against fla's chunk_simple_gla, and the whole Lightning
mixer (projections, q/k RMSNorm + RoPE, core, output RMSNorm * sigmoid gate, o_proj) against the same
mixer built from fla + plain PyTorch ops. bf16, batch 1, 32 heads of 128, hidden 4096.

    python bench/bench_lightning.py [--quick]      # this family alone; `python bench/kernels.py` runs all

``run(T_list, dtype, ceilings=None, quick=False) -> list[dict]`` returns one row per (kernel, T, impl).
Correctness gates (kernel vs reference at a small shape) run first; a kernel that fails its gate is not
timed. Times are medians of triton.testing.do_bench; peak_GiB is the memory a call adds on top of its inputs.
Mixer rows: "triton" (fused kernels + Triton core), "triton core + torch ops" (same core, HF-style PyTorch
norms/RoPE/gate: the gap to "triton" is what fusing buys) and the fla + torch-ops baseline.
"""
from __future__ import annotations

import pathlib
import sys

import torch

from salatrain_kernels.lightning import lightning_attn
from salatrain_kernels.lightning.fused import out_norm_gate, out_norm_gate_torch, qk_norm_rope, qk_norm_rope_torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
from tests.helpers.naive import lightning_naive  # noqa: E402  (the oracle the kernel tests use)

H, D, HIDDEN, CHUNK = 32, 128, 4096, 64
EPS = 1e-6


def fla_core():
    """fla's chunk_simple_gla, or None when flash-linear-attention is not installed."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla


def alibi_decay(n_heads, device):
    return 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float32, device=device) / n_heads)


# ----------------------------------------------------------------------------------------------- mixers

class MixerWeights:
    """Weights of one Lightning mixer (hidden -> H*D for q, k, v and the gate z; H*D -> hidden for o)."""

    def __init__(self, device, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        hidden, n_heads, head_dim = HIDDEN, H, D
        hd = n_heads * head_dim

        def lin(n_out, n_in):
            w = torch.randn(n_out, n_in, generator=g) * n_in ** -0.5
            return w.to(device, dtype).requires_grad_()

        self.wq, self.wk, self.wv, self.wz = (lin(hd, hidden) for _ in range(4))
        self.wo = lin(hidden, hd)
        self.q_norm = (1 + 0.1 * torch.randn(head_dim, generator=g)).to(device, dtype).requires_grad_()
        self.k_norm = (1 + 0.1 * torch.randn(head_dim, generator=g)).to(device, dtype).requires_grad_()
        self.o_norm = (1 + 0.1 * torch.randn(hd, generator=g)).to(device, dtype).requires_grad_()
        self.decay = alibi_decay(n_heads, device)
        self.n_heads, self.head_dim = n_heads, head_dim

    def params(self):
        return [self.wq, self.wk, self.wv, self.wz, self.wo, self.q_norm, self.k_norm, self.o_norm]


def rope_tables(T, head_dim, device, dtype, theta=1e6):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mixer(x, w, cos, sin, core, norm_rope, norm_gate):
    """x [B, T, hidden] -> [B, T, hidden]; core(q, k, v, decay) -> o [B, T, H, D] (q, k, v unscaled)."""
    B, T, _ = x.shape
    q = (x @ w.wq.T).view(B, T, w.n_heads, w.head_dim)
    k = (x @ w.wk.T).view(B, T, w.n_heads, w.head_dim)
    v = (x @ w.wv.T).view(B, T, w.n_heads, w.head_dim)
    z = x @ w.wz.T
    q, k = norm_rope(q, k, w.q_norm, w.k_norm, cos, sin, EPS)
    o = core(q, k, v, w.decay)
    y = norm_gate(o.reshape(B, T, -1), z, w.o_norm, EPS)
    return y @ w.wo.T


def core_ours(q, k, v, decay):
    return lightning_attn(q, k, v, decay, backend="triton")[0]


def core_torch(q, k, v, decay):
    return lightning_attn(q, k, v, decay, backend="torch")[0]


def make_core_fla(chunk_simple_gla):
    def core_fla(q, k, v, decay):
        return chunk_simple_gla(q, k, v, g_gamma=-decay, scale=q.shape[-1] ** -0.5)[0]
    return core_fla


def mixer_ours(x, w, cos, sin):
    return mixer(x, w, cos, sin, core_ours, qk_norm_rope, out_norm_gate)


def make_mixer_baseline(core):
    def mixer_baseline(x, w, cos, sin):
        return mixer(x, w, cos, sin, core, qk_norm_rope_torch, out_norm_gate_torch)
    return mixer_baseline


# ----------------------------------------------------------------------------------------------- gates

def _rule(out, ref, lowp, rel_eps):
    err = (out.double() - ref.double()).abs().max().item()
    err_lp = (lowp.double() - ref.double()).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= 2 * err_lp + rel_eps * ref.double().abs().max().item()
    return ok, f"err {err:.2e} vs torch-lowp {err_lp:.2e}"


def _core_outputs(fn, q, k, v, decay, h0, do, cu, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
    o, final = fn(*leaves[:3], decay, initial_state=leaves[3], output_final_state=True, cu_seqlens=cu, **kw)
    grads = torch.autograd.grad([o, final], leaves, [do.to(o.dtype), torch.ones_like(final)])
    return [o] + [final] + list(grads)


def gate_core(device, dtype):
    """Triton core vs the quadratic reference (varlen, initial state, all gradients). Returns (ok, note)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    T, nh = 777, 4
    q, k, v, do = (torch.randn(1, T, nh, D, generator=g).to(device, dtype) for _ in range(4))
    h0 = torch.randn(3, nh, D, D, generator=g).to(device)
    cu = torch.tensor([0, 100, 401, T], dtype=torch.int32, device=device)
    decay = alibi_decay(nh, device)
    got = _core_outputs(lightning_attn, q, k, v, decay, h0, do, cu, backend="triton")
    ref = _core_outputs(lightning_naive, *(x.float() for x in (q, k, v)), decay, h0, do.float(), cu)
    lowp = _core_outputs(lightning_naive, q, k, v, decay, h0, do, cu, compute_dtype=dtype)
    notes = []
    for name, a, r, lp in zip(["o", "final", "dq", "dk", "dv", "dh0"], got, ref, lowp):
        ok, note = _rule(a, r, lp, 1e-4)
        if not ok:
            return False, f"{name}: {note}"
        notes.append(note)
    return True, notes[0]


def gate_fla(device, dtype, chunk_simple_gla):
    """fla with g_gamma = -decay computes the same function (forward, loose check)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(1, 500, 4, D, generator=g).to(device, dtype) for _ in range(3))
    decay = alibi_decay(4, device)
    o = make_core_fla(chunk_simple_gla)(q, k, v, decay)
    ref = lightning_naive(q.float(), k.float(), v.float(), decay)[0]
    rel = ((o.float() - ref).abs().max() / ref.abs().max()).item()
    return rel < 2e-2, f"max rel err {rel:.1e}"


def gate_fused(device, dtype):
    g = torch.Generator(device="cpu").manual_seed(2)
    B, T = 2, 300
    q, k = (torch.randn(B, T, H, D, generator=g).to(device, dtype) for _ in range(2))
    qw, kw = ((1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype) for _ in range(2))
    cos, sin = rope_tables(T, D, device, dtype)
    o, z = (torch.randn(B, T, H * D, generator=g).to(device, dtype) for _ in range(2))
    ow = (1 + 0.1 * torch.randn(H * D, generator=g)).to(device, dtype)
    for fn, ref_fn, args, rest in ((qk_norm_rope, qk_norm_rope_torch, [q, k, qw, kw], (cos, sin, EPS)),
                                   (out_norm_gate, out_norm_gate_torch, [o, z, ow], (EPS,))):
        outs = []
        for f, cast in ((fn, None), (ref_fn, torch.float32), (ref_fn, None)):
            leaves = [(x if cast is None else x.to(cast)).detach().requires_grad_() for x in args]
            r = [x if cast is None or not torch.is_tensor(x) else x.to(cast) for x in rest]
            y = f(*leaves, *r)
            y = y if isinstance(y, tuple) else (y,)
            gy = [torch.ones_like(t) for t in y]
            outs.append(list(y) + list(torch.autograd.grad(y, leaves, gy)))
        for a, r, lp in zip(*outs):
            ok, note = _rule(a, r, lp, 1e-4)
            if not ok:
                return False, f"{fn.__name__}: {note}"
    return True, "fwd+grads within 2x torch-lowp"


def gate_mixer(device, dtype, baseline):
    """Our mixer and the baseline mixer compute the same function (forward, loose check)."""
    w = MixerWeights(device, dtype)
    x = torch.randn(1, 512, HIDDEN, device=device, dtype=dtype)
    cos, sin = rope_tables(512, D, device, dtype)
    with torch.no_grad():
        a, b = mixer_ours(x, w, cos, sin).float(), baseline(x, w, cos, sin).float()
    rel = ((a - b).abs().max() / b.abs().max()).item()
    return rel < 3e-2, f"max rel diff vs baseline {rel:.1e}"


# ----------------------------------------------------------------------------------------------- timing

def _timed(fn, quick):
    """(median ms, extra peak GiB) of fn(); ("OOM", None) when it does not fit."""
    import triton.testing

    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")
        return ms, peak
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", None


def _core_cases(T, dtype, device):
    q, k, v, do = (torch.randn(1, T, H, D, device=device, dtype=dtype) for _ in range(4))
    return q, k, v, do, alibi_decay(H, device)


def _fwd_bwd(core, q, k, v, do, decay):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            core(q, k, v, decay)

    def fwd_bwd():
        o = core(*leaves, decay)
        torch.autograd.grad(o, leaves, do)

    return fwd, fwd_bwd


def core_flops(T, fwd_bwd):
    """Chunked-algorithm FLOPs: per token and head 2*C*D (QK^T) + 2*C*D (AV) + 2*D*D (QS) + 2*D*D (K^T V);
    backward counted as twice the forward."""
    f = 4 * T * H * D * (CHUNK + D)
    return 3 * f if fwd_bwd else f


def core_bytes(T, fwd_bwd, itemsize=2):
    """Compulsory traffic: fwd reads q, k, v and writes o; bwd reads q, k, v, do and writes dq, dk, dv."""
    return (11 if fwd_bwd else 4) * T * H * D * itemsize


def mixer_flops(T, fwd_bwd):
    f = 5 * 2 * T * HIDDEN * H * D + core_flops(T, False)
    return 3 * f if fwd_bwd else f


def _row(kernel, T, impl, fwd, fwd_bwd, peak, flops, nbytes, ceilings, note=""):
    row = dict(kernel=kernel, T=T, impl=impl, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, speedup=None, peak_GiB=peak)
    if isinstance(fwd_bwd, float):
        tflops = flops / fwd_bwd / 1e9
        row["TFLOP/s"] = tflops
        if ceilings:
            row["%peak_flops"] = 100 * tflops / ceilings["matmul_tflops"]
        if nbytes:
            gbps = nbytes / fwd_bwd / 1e6
            row["GB/s"] = gbps
            if ceilings:
                row["%peak_bw"] = 100 * gbps / ceilings["copy_gbps"]
    row["note"] = note
    return row


def bench_core(T, dtype, device, impls, ceilings, quick):
    q, k, v, do, decay = _core_cases(T, dtype, device)
    rows = []
    for name, core in impls:
        fwd, fwd_bwd = _fwd_bwd(core, q, k, v, do, decay)
        ms_f, _ = _timed(fwd, quick)
        ms_fb, peak = _timed(fwd_bwd, quick)
        rows.append(_row("lightning core", T, name, ms_f, ms_fb, peak, core_flops(T, True), core_bytes(T, True),
                         ceilings))
    return rows


def bench_mixer(T, dtype, device, impls, ceilings, quick):
    w = MixerWeights(device, dtype)
    x = torch.randn(1, T, HIDDEN, device=device, dtype=dtype)
    dy = torch.randn(1, T, HIDDEN, device=device, dtype=dtype)
    cos, sin = rope_tables(T, D, device, dtype)
    leaves = [x.detach().requires_grad_()] + w.params()
    rows = []
    for name, fn in impls:
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x, w, cos, sin)

        def fwd_bwd(fn=fn):
            y = fn(leaves[0], w, cos, sin)
            torch.autograd.grad(y, leaves, dy)

        ms_f, _ = _timed(fwd, quick)
        ms_fb, peak = _timed(fwd_bwd, quick)
        rows.append(_row("lightning mixer", T, name, ms_f, ms_fb, peak, mixer_flops(T, True), None, ceilings))
    return rows


def _speedups(rows, ours="triton"):
    """Fill 'speedup' (baseline fwd+bwd / ours fwd+bwd) on the baseline rows of each (kernel, T)."""
    for r in rows:
        mine = [o for o in rows if o["kernel"] == r["kernel"] and o["T"] == r["T"] and o["impl"] == ours]
        if r["impl"] != ours and mine and isinstance(mine[0]["fwd_bwd_ms"], float) \
                and isinstance(r["fwd_bwd_ms"], float):
            r["speedup"] = r["fwd_bwd_ms"] / mine[0]["fwd_bwd_ms"]
    return rows


def run(T_list, dtype=torch.bfloat16, ceilings=None, quick=False, device="cuda"):
    fla = fla_core()
    gates = {"core": gate_core(device, dtype), "fused": gate_fused(device, dtype)}
    if fla is not None:
        gates["fla"] = gate_fla(device, dtype, fla)
    fla_ok = fla is not None and gates["fla"][0]
    mixer_base = make_mixer_baseline(make_core_fla(fla) if fla_ok else core_torch)
    base_name = "fla + torch ops" if fla_ok else "torch chunked + torch ops"
    if gates["core"][0] and gates["fused"][0]:
        gates["mixer"] = gate_mixer(device, dtype, mixer_base)
    for name, (ok, note) in gates.items():
        print(f"[gate] lightning {name}: {'PASS' if ok else 'FAIL'} ({note})", flush=True)
    if not gates["core"][0]:
        return [dict(kernel="lightning core", T="-", impl="triton", note="correctness gate failed: not timed")]
    core_impls = [("triton", core_ours)] + ([("fla chunk_simple_gla", make_core_fla(fla))] if fla_ok else [])
    mixer_ours_ok = gates["fused"][0] and gates["mixer"][0]
    rows = []
    for T in T_list:
        impls = list(core_impls)
        if T <= 8192:
            impls.append(("torch chunked", core_torch))
        rows += bench_core(T, dtype, device, impls, ceilings, quick)
        torch.cuda.empty_cache()
        # "triton core + torch ops" isolates what the fused norm/RoPE and norm/gate kernels buy
        mixers = ([("triton", mixer_ours), ("triton core + torch ops", make_mixer_baseline(core_ours))]
                  if mixer_ours_ok else []) + ([(base_name, mixer_base)] if (fla_ok or T <= 8192) else [])
        rows += bench_mixer(T, dtype, device, mixers, ceilings, quick)
        torch.cuda.empty_cache()
        print(f"[lightning] T={T} done", flush=True)
    if fla is None:
        rows.append(dict(kernel="lightning core", T="-", impl="fla chunk_simple_gla", note="fla not installed"))
    return _speedups(rows)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from kernels import format_table  # bench/kernels.py

    T_list = [8192, 32768] if args.quick else [8192, 32768, 131072]
    print(format_table(run(T_list, quick=args.quick)))
