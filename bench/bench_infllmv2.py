"""InfLLM-V2 sparse attention on the GPU: block scoring + top-K selection + block-sparse attention, forward and
forward+backward, against dense causal torch SDPA (FlashAttention, GQA) and fla's parallel_nsa (compression +
top-16 x 64-token blocks). SALA shapes: bf16, batch 1, 32 query heads, 2 KV heads (G = 16), head dim 128,
block 64, kernel 32 / stride 16, init 1, topk 64, window 2048, dense_len 8192 (96 blocks = 6144 keys per query).

    python bench/bench_infllmv2.py [--quick] [--T 8192 32768]   # this family; `python bench/kernels.py` runs all

``run(T_list, dtype, ceilings=None, quick=False) -> list[dict]``: one row per (kernel, T, impl). A correctness
gate (full op and each stage vs the PyTorch references at T = 2048, forward and gradients, both normalisers)
runs first; a failing kernel is not timed. Times: median of CUDA-event timings (ms) of repeated calls after a
warm-up; peak_GiB = memory a call adds on top of its inputs; TFLOP/s counts useful work (scoring: q·k_cmp for
both passes; attention: 4·D per visible key, backward = 2.5x forward) against the measured bf16 matmul ceiling.
`speedup` = that row's fwd+bwd time / ours (exact normaliser) on the same data, `fwd_speedup` the same for the
forward. Where some queries are sparse (T past the dense prefix), ours also runs with neighbouring queries
sharing gathered blocks (share_tokens 4, 8) and on q/k that drift along T ("correlated": a moving sum over 256
positions), where selections overlap as in a real model;
"overlap" rows give the blocks a tile loads with sharing over those its queries load alone.
"""
from __future__ import annotations

import argparse
import pathlib
import signal
import sys
import time

import torch

from salatrain_kernels.infllm_v2 import (
    infllmv2_attn,
    infllmv2_block_scores,
    infllmv2_block_scores_torch,
    infllmv2_select,
    infllmv2_select_torch,
)
from salatrain_kernels.infllm_v2.interface import dense_causal_sdpa, dense_prefix_rows, score_chunks, select_blocks
from salatrain_kernels.infllm_v2.layout import DocLayout
from salatrain_kernels.infllm_v2.params import SparseParams
from salatrain_kernels.infllm_v2.shared import SHARE_MAX_UNION, pack_share
from salatrain_kernels.infllm_v2.plan import AttnPlan, SparseAttnFn, window_split_exact

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
from tests.helpers.naive import infllmv2_block_attn_naive, selection_margin  # noqa: E402  (as the kernel tests)

HQ, HKV, D = 32, 2, 128
SHARE = (4, 8)  # share_tokens timed beside the per-query kernels
OVERLAP_RULE = 0.5  # share_max_union timed beside forced sharing
ATOMIC_ROWS = (64,)  # query rows a gathered dk/dv step, timed with dq_mode="atomic" (32 and 128 lost more: perf.md)
CORRELATION_TOKENS = 256  # "correlated" q/k: a moving sum over this many positions
SALA = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=64, window_size=2048, dense_len=8192)
GATE = dict(SALA, topk=8, window_size=256, dense_len=512)
GATE_T, GATE_HEADS = 2048, (16, 1)
OURS = "triton (exact)"
PACKED, UNPACKED = "triton (packed small group)", "triton (per-query tiles)"
DENSE = "sdpa default (dense)"
BASELINES = {
    DENSE: "torch scaled_dot_product_attention(is_causal=True, enable_gqa=True) on contiguous [B, H, T, D] tensors "
           "with torch's default dispatch: what a user gets (cuDNN attention on an H200 with torch 2.11)",
    "sdpa flash forced (dense)": "the same with SDPBackend.FLASH_ATTENTION forced on transposed [B, T, H, D] views "
                                 "(FlashAttention-2; slower than the default on Hopper): shown beside it, never "
                                 "as the baseline",
    "fla parallel_nsa top16x64": "fla.ops.nsa.parallel_nsa: compression attention + top-16 selection of 64-token "
                                 "blocks + selected attention (window 0); skipped when fla is not installed",
}


# ------------------------------------------------------------------------------------------------ baselines
def _with_plan(name, value, fn):
    """fn() with the plan module's setting ``name`` (DKDV_ROWS, PACK_SMALL_GROUPS, ...) at value, restored after."""
    from salatrain_kernels.infllm_v2 import plan

    before = getattr(plan, name)
    setattr(plan, name, value)
    try:
        return fn()
    finally:
        setattr(plan, name, before)


def _with_dkdv_rows(n, fn):
    """fn() with the gathered dk/dv kernel taking n query rows a step."""
    return _with_plan("DKDV_ROWS", n, fn)


def _packed(fn, on=True):
    """fn() with small groups packed (PACK_SMALL_GROUPS: neighbouring queries fill a 16-row tile) or not."""
    return _with_plan("PACK_SMALL_GROUPS", on, fn)


def sdpa_default(q, k, v):
    """Dense causal GQA attention with torch's default dispatch; q, k, v contiguous [B, H, T, D]."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_flash_forced(q, k, v):
    """Dense causal attention with the FlashAttention-2 backend forced, on transposed [B, T, H, D] views."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        except RuntimeError:
            group = q.shape[2] // k.shape[2]
            kt, vt = (x.repeat_interleave(group, dim=1) for x in (kt, vt))
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return out.transpose(1, 2)


def fla_nsa():
    """fla's parallel_nsa as f(q, k, v), or None when flash-linear-attention is not installed."""
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError:
        return None

    def run_nsa(q, k, v):
        gate = torch.full(q.shape[:3], 0.5, device=q.device, dtype=q.dtype)
        return parallel_nsa(q, k, v, g_cmp=gate, g_slc=gate, block_counts=16, block_size=64)

    return run_nsa


# ------------------------------------------------------------------------------------------------ gates
def _rule(out, ref, lowp, rel_eps=1e-4):
    err = (out.double() - ref.double()).abs().max().item()
    err_lp = (lowp.double() - ref.double()).abs().max().item()
    ok = bool(torch.isfinite(out).all()) and err <= 2 * err_lp + rel_eps * ref.double().abs().max().item()
    return ok, f"err {err:.2e} vs torch-lowp {err_lp:.2e}"


def gate(device, dtype, normalizer, heads=GATE_HEADS, **options):
    """Full op at T = 2048 (G = 16 unless ``heads`` says otherwise, the timed head dim): selection vs reference,
    output and gradients within 2x torch-lowp."""
    g = torch.Generator(device="cpu").manual_seed(0)
    T, (heads, kv_heads) = GATE_T, heads
    q = torch.randn(1, T, heads, D, generator=g).to(device, dtype)
    k, v = (torch.randn(1, T, kv_heads, D, generator=g).to(device, dtype) for _ in range(2))
    do = torch.randn(1, T, heads, D, generator=g).to(device, dtype)
    score_kw = {n: GATE[n] for n in ("block_size", "kernel_size", "kernel_stride")}
    score_kw["normalizer"] = normalizer
    sel_kw = {n: GATE[n] for n in ("block_size", "init_blocks", "topk", "window_size")}
    sel_kw["seqlen_k"] = T
    idx = infllmv2_select(infllmv2_block_scores(q, k, backend="triton", **score_kw), backend="triton", **sel_kw)
    ref_scores = infllmv2_block_scores_torch(q.float(), k.float(), **score_kw)
    ref_idx = infllmv2_select_torch(ref_scores, **sel_kw)
    mismatch = (idx != ref_idx).any(-1)[..., GATE["dense_len"]:].float().mean().item()
    margin = selection_margin(idx, ref_scores, **sel_kw)[..., GATE["dense_len"]:].min().item()
    allowed = (6e-2 if dtype != torch.float32 else 1e-5) * ref_scores[torch.isfinite(ref_scores)].abs().max().item()
    if margin < -allowed:  # a row's choice is not a top-K of the reference scores within the score error
        return False, f"selection off by {-margin:.2e} (allowed {allowed:.1e})"
    attn_kw = dict(block_size=GATE["block_size"], dense_len=GATE["dense_len"])
    outs = {}
    for name, fn, cast in (
        ("ours", lambda *x: infllmv2_attn(*x, backend="triton", normalizer=normalizer, **options, **GATE), None),
        ("ref", lambda *x: infllmv2_block_attn_naive(*x, idx, **attn_kw), torch.float32),
        ("lowp", lambda *x: infllmv2_block_attn_naive(*x, idx, upcast=False, **attn_kw), None),
    ):
        leaves = [(x if cast is None else x.to(cast)).detach().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        outs[name] = [o] + list(torch.autograd.grad(o, leaves, do.to(o.dtype)))
    notes = []
    for what, a, r, lp in zip(("o", "dq", "dk", "dv"), outs["ours"], outs["ref"], outs["lowp"]):
        ok, note = _rule(a, r, lp)
        if not ok:
            return False, f"{what}: {note}"
        notes.append(f"{what} {note.split(' vs')[0]}")
    return True, f"rows selecting other blocks than fp32 {mismatch:.1%} (margin {margin:.1e}); " + ", ".join(notes)


def parse_heads(text: str) -> tuple[int, int, int]:
    """--heads HQ,HKV,D of the benchmarks: (query heads, key/value heads, head dim); exits with a one-line error."""
    try:
        hq, hkv, d = (int(x) for x in text.split(","))
    except ValueError:
        sys.exit(f"--heads takes HQ,HKV,D (got {text!r})")
    if min(hq, hkv, d) < 1 or hq % hkv:
        sys.exit(f"--heads {text}: HKV must divide HQ, all positive")
    return hq, hkv, d


def emit(lines: list[str], out) -> None:
    """Print a benchmark's markdown and append it to `out` (a path, or None)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "a") as fh:
            fh.write(text)


def run_lengths(doc: str, title: str, measure, table: tuple[str, ...] = ()) -> None:
    """The command line of a per-length benchmark at SALA's shape: --T (default 32K 128K) and --out; prints (and
    appends to --out) a header (title, the card, the shape), the table's head and measure(T)'s lines per length."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--out", type=pathlib.Path, default=None)
    a = ap.parse_args()
    lines = [f"## {title} — {torch.cuda.get_device_name()}", "",
             f"{HQ} query / {HKV} KV heads, d{D}, bf16, batch 1, SALA's sparse settings, random q/k", "", *table]
    for T in a.T:
        lines += measure(T)
    emit(lines, a.out)


# ------------------------------------------------------------------------------------------------ timing
def peak_gib(fn) -> float:
    """GiB allocated at the peak of one fn() call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _timed(fn, quick):
    """(median ms, extra peak GiB) of fn(); ("OOM", None) when it does not fit."""
    try:
        peak = peak_gib(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times, budget, spent = [], (150.0 if quick else 400.0), 0.0
        while len(times) < 3 or (spent < budget and len(times) < 25):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            spent += times[-1]
        return sorted(times)[len(times) // 2], peak
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", None


def _fwd_and_fwd_bwd(fn, q, k, v, do):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        o = fn(*leaves)
        torch.autograd.grad(o, leaves, do)

    return fwd, fwd_bwd


def visible_keys(T, p):
    """Keys each query attends to, summed over queries (dense rows: t+1; sparse rows: K blocks, causal)."""
    t = torch.arange(T, dtype=torch.float64)
    k = p["topk"] + p["window_size"] // p["block_size"]
    sparse = (torch.clamp(t // p["block_size"] + 1, max=k) - 1) * p["block_size"] + t % p["block_size"] + 1
    return torch.where(t < p["dense_len"], t + 1, sparse).sum().item()


def scoring_windows(T, p, normalizer):
    """Compressed windows touched per sparse query, summed (pass 1 + pass 2)."""
    t = torch.arange(min(p["dense_len"], T), T, dtype=torch.float64)
    fine = torch.clamp((t + 1 - p["kernel_size"]) // p["kernel_stride"] + 1, min=0)
    coarse = torch.clamp((t + 1 - 4 * p["kernel_size"]) // (4 * p["kernel_stride"]) + 1, min=0)
    return (fine + (fine if normalizer == "exact" else coarse)).sum().item()


def flops(T, normalizer=None, fwd_bwd=True):
    attn = 4 * D * HQ * visible_keys(T, SALA if normalizer else dict(SALA, dense_len=10**12))
    score = 2 * D * HQ * scoring_windows(T, SALA, normalizer) if normalizer else 0.0
    return score + (3.5 if fwd_bwd else 1.0) * attn


def _row(T, impl, fwd, fwd_bwd, peak, work, ceilings, note="", kernel="infllmv2", data="random"):
    row = dict(kernel=kernel, T=T, impl=impl, data=data, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, speedup=None,
               fwd_speedup=None, peak_GiB=peak)
    ms = fwd_bwd if isinstance(fwd_bwd, float) else fwd
    if work and isinstance(ms, float):
        row["TFLOP/s"] = work / ms / 1e9
        if ceilings:
            row["%peak_flops"] = 100 * row["TFLOP/s"] / ceilings["matmul_tflops"]
    row["note"] = note
    return row


def stage_rows(T, q, k, v, do, ceilings, quick):
    """Forward breakdown of ours (exact normaliser): scoring, selection, attention given the blocks."""
    params = SparseParams(**SALA)
    scale = D**-0.5
    prefix = min(SALA["dense_len"], T)
    qs = q[:, prefix:]
    layout = DocLayout.build(qs, k, None)
    q3, k3 = qs.reshape(-1, HQ, D), k.reshape(-1, HKV, D)

    def scoring():
        for _ in score_chunks(q3, k3, layout, params, scale):
            pass

    def scoring_selection():
        return select_blocks(q3, k3, layout, params, scale)

    block_idx = scoring_selection()
    split = window_split_exact(params.init_blocks, params.topk, params.window_size, params.block_size)
    plan = AttnPlan(layout, HQ, HKV, D, q.dtype, SALA["block_size"], scale, SALA["dense_len"],
                    local_window=params.window_size if split else 0)  # as infllmv2_attn builds it

    def attention(q_, k_, v_):
        parts = [dense_causal_sdpa(q_[:, :prefix], k_[:, :prefix], v_[:, :prefix], scale)]
        parts.append(SparseAttnFn.apply(q_[:, prefix:], k_, v_, block_idx, plan))
        return torch.cat(parts, dim=1)

    s_ms, _ = _timed(scoring, quick)
    ss_ms, _ = _timed(scoring_selection, quick)
    fwd, fwd_bwd = _fwd_and_fwd_bwd(attention, q, k, v, do)
    a_ms, _ = _timed(fwd, quick)
    ab_ms, a_peak = _timed(fwd_bwd, quick)
    attn_work = flops(T, "exact") - 2 * D * HQ * scoring_windows(T, SALA, "exact")
    sel = ss_ms - s_ms if isinstance(ss_ms, float) and isinstance(s_ms, float) else None
    return [
        _row(T, "stage: scoring", s_ms, None, None, 2 * D * HQ * scoring_windows(T, SALA, "exact"), ceilings,
             "2 passes over compressed keys, group-summed, block max", kernel="infllmv2 stages"),
        _row(T, "stage: selection", sel, None, None, 0, ceilings, f"top-{params.num_selected} per (query, group)",
             kernel="infllmv2 stages"),
        _row(T, "stage: attention", a_ms, ab_ms, a_peak, attn_work, ceilings,
             "given blocks; dense prefix via SDPA", kernel="infllmv2 stages"),
    ]


def correlated(shape, gen, width=CORRELATION_TOKENS):
    """[1, T, H, D] with unit-variance entries that change slowly along T: a moving sum of i.i.d. noise over
    ``width`` tokens (neighbouring positions share all but one term), as a converted model's q/k drift."""
    x = torch.randn(shape[0], shape[1] + width, *shape[2:], generator=gen, dtype=torch.float64)
    c = torch.cumsum(x, dim=1)
    return ((c[:, width:] - c[:, :-width]) / width**0.5).float()


def make_inputs(T, dtype, device, data="random"):
    """q, k, v, dO at T: i.i.d. normal ("random") or with q and k correlated along T ("correlated", a moving sum
    over CORRELATION_TOKENS positions; "correlated wN": over N)."""
    g = torch.Generator(device="cpu").manual_seed(T)
    width = int(data.split(" w")[1]) if " w" in data else CORRELATION_TOKENS
    draw = (lambda shape: torch.randn(shape, generator=g)) if data == "random" else (
        lambda shape: correlated(shape, g, width))
    q = draw((1, T, HQ, D)).to(device, dtype)
    k = draw((1, T, HKV, D)).to(device, dtype)
    v = torch.randn(1, T, HKV, D, generator=g).to(device, dtype)
    do = torch.randn(1, T, HQ, D, generator=g).to(device, dtype)
    return q, k, v, do


def block_overlap(q, k, tq, settings=SALA):
    """Blocks a tile of tq neighbouring sparse queries loads with sharing, per query, over the blocks one query
    loads alone (1.0: no overlap, 1/tq: all tq queries chose the same blocks). q [1, T, HQ, D], k [1, T, HKV, D];
    ``settings``: the sparse keys of SparseParams (SALA's by default)."""
    from salatrain_kernels.infllm_v2.shared import union_lists

    params = SparseParams(**settings)
    (_, _, hq, d), hkv = q.shape, k.shape[2]
    q3, k3 = q[0], k[0]
    layout = DocLayout.build(q, k, None)
    if q.is_cuda:
        idx3 = select_blocks(q3, k3, layout, params, d**-0.5)
    else:  # the PyTorch reference's scores and selection (the same blocks, without Triton)
        scores = infllmv2_block_scores(q, k, block_size=params.block_size, kernel_size=params.kernel_size,
                                       kernel_stride=params.kernel_stride, backend="torch")
        idx3 = infllmv2_select(scores, block_size=params.block_size, init_blocks=params.init_blocks,
                               topk=params.topk, window_size=params.window_size, backend="torch")[0]
        idx3 = idx3[..., : min(params.num_selected, layout.max_blocks(params.block_size))].contiguous()
    split = window_split_exact(params.init_blocks, params.topk, params.window_size, params.block_size)
    plan = AttnPlan(layout, hq, hkv, d, q.dtype, params.block_size, d**-0.5, params.dense_len,
                    local_window=params.window_size if split else 0)  # as infllmv2_attn builds it
    counts = plan.list_lengths(idx3)  # the gathered entries (the local window goes to the tile kernels)
    rows = torch.cat([ch.sparse_rows for ch in plan.chunks])
    if rows.numel() == 0:
        return None
    _, _, ucount, _ = union_lists(idx3, counts, rows, torch.zeros(q.shape[1], dtype=torch.long, device=q.device),
                               layout.max_blocks(params.block_size), tq)
    return (ucount.float().sum() / counts[:, rows.long()].float().sum()).item()


def bench_T(T, dtype, device, impls, ceilings, quick, data="random", extras=True):
    q, k, v, do = make_inputs(T, dtype, device, data)
    bhtd = [x.transpose(1, 2).contiguous() for x in (q, k, v, do)]  # the layout a dense user holds
    rows = []
    for name, fn, work, note in impls:
        args = bhtd if name == DENSE else (q, k, v, do)
        fwd, fwd_bwd = _fwd_and_fwd_bwd(fn, *args)
        ms_f, _ = _timed(fwd, quick)
        ms_fb, peak = _timed(fwd_bwd, quick)
        rows.append(_row(T, name, ms_f, ms_fb, peak, work, ceilings, note, data=data))
        print(f"[row] T={T} {name}: fwd {ms_f} ms, fwd+bwd {ms_fb} ms, peak {peak}", flush=True)
        torch.cuda.empty_cache()
    if T > SALA["dense_len"] and data == "random" and extras:
        rows += stage_rows(T, q, k, v, do, ceilings, quick)
    if T > SALA["dense_len"] and extras:
        for tq in SHARE:
            ratio = block_overlap(q, k, tq)
            print(f"[overlap] T={T} {data}: share x{tq} loads {ratio:.3f} of the unshared blocks", flush=True)
            rows.append(dict(kernel="infllmv2 overlap", T=T, impl=f"blocks loaded, share x{tq} / unshared", data=data,
                             fwd_ms=None, fwd_bwd_ms=None, note=f"{ratio:.3f}"))
    return rows


def _speedups(rows):
    """speedup = baseline time / ours; for our rows, key_rate_vs_dense = attended keys per second relative to
    the default dense attention in the same run (per-key efficiency: 1.0 would be cuDNN's rate per key)."""
    for r in rows:
        dense = [o for o in rows if o["impl"] == DENSE and o["T"] == r["T"]]
        if r["impl"].startswith("triton") and dense and isinstance(r["fwd_bwd_ms"], float) and \
                isinstance(dense[0]["fwd_bwd_ms"], float):
            keys_ours, keys_dense = visible_keys(r["T"], SALA), r["T"] * (r["T"] + 1) / 2
            r["key_rate_vs_dense"] = (keys_ours / r["fwd_bwd_ms"]) / (keys_dense / dense[0]["fwd_bwd_ms"])
    for r in rows:
        mine = [o for o in rows if o["kernel"] == "infllmv2" and o["T"] == r["T"] and o["impl"] == OURS
                and o.get("data") == r.get("data", "random")]
        if r["kernel"] != "infllmv2" or r["impl"] == OURS or not mine:
            continue
        for key, out in (("fwd_bwd_ms", "speedup"), ("fwd_ms", "fwd_speedup")):
            if isinstance(r[key], float) and isinstance(mine[0][key], float):
                r[out] = r[key] / mine[0][key]
    return rows


def measure_ceilings():
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms, _ = _timed(lambda: a @ b, quick=True)
    return {"matmul_tflops": 2 * n**3 / ms / 1e9}


def run(T_list, dtype=torch.bfloat16, ceilings=None, quick=False, device="cuda", only=None, widths=(), share=SHARE):
    t0 = time.time()
    wanted = lambda name: not only or any(w in name for w in only)  # noqa: E731
    small = HQ // HKV < 16  # a small group: neighbouring queries can fill the tile's padding rows
    small_heads = (HQ // HKV * 4, 4)  # the timed group over four K/V heads (one K/V head at D = 64 sits at the rule)
    gates = {"exact": gate(device, dtype, "exact", heads=small_heads if small else GATE_HEADS)}
    failed = (False, "not run (not asked for)")
    gates["coarse"] = gate(device, dtype, "coarse") if wanted("triton (coarse)") else failed
    gates["atomic dq"] = gate(device, dtype, "exact", dq_mode="atomic") if wanted("triton (atomic dq)") else failed
    gates["pointer"] = gate(device, dtype, "exact", kv_loads="pointer") if wanted("(pointer loads)") else failed
    for name, on in ((PACKED, True), (UNPACKED, False)):  # small groups packed or not, whatever the default
        gates[name] = (_packed(lambda: gate(device, dtype, "exact", heads=small_heads), on=on)
                       if small and wanted(name) else failed)
    for norm, (ok, note) in gates.items():
        print(f"[gate] infllmv2 {norm}: {'PASS' if ok else 'skipped' if note.startswith('not run') else 'FAIL'} "
              f"({note})", flush=True)
    print(f"[infllmv2] gates {time.time() - t0:.0f} s", flush=True)
    if not gates["exact"][0]:
        return [dict(kernel="infllmv2", T="-", impl=OURS, note="correctness gate failed: not timed")]
    nsa = fla_nsa()
    rows = []
    try:
        _time_lengths(T_list, dtype, device, ceilings, quick, only, widths, share, gates, nsa, rows, t0)
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGTERM (main): the table still holds what was timed
        print(f"[infllmv2] stopped after {time.time() - t0:.0f} s: the table holds the rows timed so far", flush=True)
    if nsa is None:
        rows.append(dict(kernel="infllmv2", T="-", impl="fla parallel_nsa top16x64", note="fla not installed"))
    return _speedups(rows)


def _time_lengths(T_list, dtype, device, ceilings, quick, only, widths, share, gates, nsa, rows, t0):
    """Time every row at each length, appending to rows as they finish."""
    for T in T_list:
        # most telling rows first (a time limit cuts the tail): ours, the baseline, block sharing where sparse
        # queries exist (below SALA's dense_len every row is in the SDPA prefix and sharing has nothing to share)
        sparse_rows = dense_prefix_rows(T, SparseParams(**SALA)) < T
        impls = [(OURS, lambda q, k, v: infllmv2_attn(q, k, v, backend="triton", **SALA), flops(T, "exact"),
                  "scoring + selection + attention; dense prefix via SDPA"),
                 (DENSE, sdpa_default, flops(T), "dense causal, default dispatch (the baseline)")]
        if sparse_rows and gates["atomic dq"][0]:
            for n_rows in ATOMIC_ROWS:
                impls.append((f"triton (atomic dq{'' if n_rows == 64 else f', {n_rows} rows'})",
                              lambda q, k, v, n_rows=n_rows: _with_dkdv_rows(n_rows, lambda: infllmv2_attn(
                                  q, k, v, backend="triton", dq_mode="atomic", **SALA)), flops(T, "exact"),
                              f"sparse rows' dq added in the dk/dv pass with fp32 atomics (dq_mode=atomic), "
                              f"{n_rows} query rows a dk/dv step"))
        for name, on, note in (
            (PACKED, True, f"PACK_SMALL_GROUPS on: {pack_share(HQ // HKV)} neighbouring queries fill a 16-row tile "
                           "and share their gathered blocks"),
            (UNPACKED, False, "PACK_SMALL_GROUPS off: every query its own 16-row tile"),
        ):
            if sparse_rows and gates[name][0]:
                impls.append((name, lambda q, k, v, on=on: _packed(
                    lambda: infllmv2_attn(q, k, v, backend="triton", **SALA), on=on), flops(T, "exact"), note))
        for tq in share if sparse_rows else ():
            impls.append((f"triton shared x{tq}", lambda q, k, v, tq=tq: infllmv2_attn(
                q, k, v, backend="triton", share_tokens=tq, share_max_union=1.0, **SALA), flops(T, "exact"),
                f"{tq} neighbouring queries share each gathered block (share_tokens={tq}, every tile: "
                f"share_max_union=1; the default is {SHARE_MAX_UNION})"))
            impls.append((f"triton shared x{tq} (where lists overlap)", lambda q, k, v, tq=tq: infllmv2_attn(
                q, k, v, backend="triton", share_tokens=tq, share_max_union=OVERLAP_RULE, **SALA), flops(T, "exact"),
                f"a tile of {tq} queries shares when its union is at most {OVERLAP_RULE} of their lists"))
        if gates["pointer"][0]:  # the gathered kernels' K/V loads before tensor descriptors (kv_loads="tma")
            impls.append(("triton (pointer loads)", lambda q, k, v: infllmv2_attn(
                q, k, v, backend="triton", kv_loads="pointer", **SALA), flops(T, "exact"),
                "gathered K/V blocks by per-element pointers (kv_loads=pointer)"))
            if sparse_rows:
                impls.append(("triton shared x4 (pointer loads)", lambda q, k, v: infllmv2_attn(
                    q, k, v, backend="triton", kv_loads="pointer", share_tokens=4, **SALA), flops(T, "exact"),
                    "share_tokens=4, K/V blocks by pointers"))
        impls.append(("triton (released rules)", lambda q, k, v: infllmv2_attn(
            q, k, v, backend="triton", dense_len_mode="sequence", local_blocks="block", **SALA), flops(T, "exact"),
            "MiniCPM-SALA's selection rules: dense_len_mode=sequence, local_blocks=block"))
        if gates["coarse"][0]:
            impls.append(("triton (coarse)", lambda q, k, v: infllmv2_attn(
                q, k, v, backend="triton", normalizer="coarse", **SALA), flops(T, "coarse"),
                "LSE from 128/64 windows"))
        impls.append(("sdpa flash forced (dense)", sdpa_flash_forced, flops(T), "dense causal, FA2 forced"))
        if nsa is not None:
            impls.append(("fla parallel_nsa top16x64", nsa, None, "compression + top-16 x 64 selection"))
        if only:  # ours and the baseline always, then the named rows
            impls = [i for i in impls if i[0] in (OURS, DENSE) or any(name in i[0] for name in only)]
        rows += bench_T(T, dtype, device, impls, ceilings, quick, extras=not only)
        torch.cuda.empty_cache()
        # the same kernels, and fla's (whose gathers may also find more in L2 when selections overlap), on q/k that
        # drift along T as a converted model's do; dense attention's time does not depend on the values
        if sparse_rows:
            ours = [i for i in impls if i[0] == OURS or i[0].startswith("triton shared") or "atomic" in i[0]
                    or "pointer" in i[0] or i[0] in (PACKED, UNPACKED) or i[0].startswith("fla")]
            for data in [f"correlated w{w}" for w in widths] or ["correlated"]:
                rows += bench_T(T, dtype, device, ours, ceilings, quick, data=data, extras=not only)
                if only:  # the overlap of this data (the full run prints it with the extras)
                    ratio = block_overlap(*make_inputs(T, dtype, device, data)[:2], 4)
                    print(f"[overlap] T={T} {data}: share x4 loads {ratio:.3f} of the unshared blocks", flush=True)
                    rows.append(dict(kernel="infllmv2 overlap", T=T, impl="blocks loaded, share x4 / unshared",
                                     data=data, fwd_ms=None, fwd_bwd_ms=None, note=f"{ratio:.3f}"))
                torch.cuda.empty_cache()
        print(f"[infllmv2] T={T} done ({time.time() - t0:.0f} s)", flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    global HQ, HKV, D
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 8K and 32K, shorter timing loops")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 8K 32K 128K)")
    p.add_argument("--only", nargs="+", help="time only the rows whose name contains one of these (ours and the "
                   "dense baseline always), e.g. --only atomic 'shared x4' pointer")
    p.add_argument("--correlation-tokens", type=int, nargs="+", default=[],
                   help=f"time the correlated rows with q/k summed over these many positions instead of "
                        f"{CORRELATION_TOKENS} (fewer overlap less: 16 gives a real model's 0.35-0.40 at share x4)")
    p.add_argument("--share", type=int, nargs="+", default=list(SHARE),
                   help=f"share_tokens values of the shared rows (default {' '.join(map(str, SHARE))})")
    p.add_argument("--heads", default=None, metavar="HQ,HKV,D",
                   help=f"query heads, key/value heads and head dim of the timed layer (default {HQ},{HKV},{D}: "
                        "SALA's); "
                        "e.g. 9,3,64 is SmolLM2-135M's, whose G = 3 heads fill 3 of a tile's 16 rows, so sharing "
                        "4 queries a tile costs the matmuls nothing")
    args = p.parse_args(argv)
    if args.heads:
        HQ, HKV, D = parse_heads(args.heads)
    if not torch.cuda.is_available():
        sys.exit("bench_infllmv2.py needs a CUDA GPU")
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` ends the run with the table of what was timed
    T_list = args.T or ([8192, 32768] if args.quick else [8192, 32768, 131072])
    print(f"[infllmv2] {HQ} query / {HKV} key-value heads (G = {HQ // HKV}), head dim {D}, bf16, batch 1", flush=True)
    rows = run(T_list, torch.bfloat16, ceilings=measure_ceilings(), quick=args.quick, only=args.only,
               widths=args.correlation_tokens, share=tuple(args.share))
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r.get(k):.3g}" if isinstance(r.get(k), float) else ("" if r.get(k) is None else str(r.get(k)))
                 for k in keys]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
