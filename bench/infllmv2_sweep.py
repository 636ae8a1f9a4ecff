"""Where the InfLLM-V2 fwd+bwd time goes, and what the attention stage's launch settings are worth (GPU).

    python bench/infllmv2_sweep.py [--T 32768 131072] [--out FILE] [--only NAME ...] [--heads HQ,HKV,D] [--no-profile]
        [--profile-also NAME ...]

1. A CUDA-time breakdown of one forward+backward per kernel (torch.profiler), at SALA shapes (bf16, batch 1,
   32 query / 2 KV heads, head dim 128, block 64, kernel 32/16, topk 64, window 2048, dense_len 8192).
2. Forward+backward median time (triton.testing.do_bench) with one AttnPlan setting changed at a time:
   dkdv_bn x dkdv_bm (local dk/dv key tile x query step), dkdv_rows (query rows per gathered dk/dv step),
   dkdv_chunk (queries per dk/dv program), dkdv_nsplit (local dk/dv programs per group), dkdv_gather_launch
   (gathered dk/dv warps and stages), dkdv_keys (keys per gathered dk/dv program), dkdv_prefetch (gathered dk/dv
   steps loaded during the step before, or Triton's pipeliner), blocks_per_step (64-key blocks per gathered
   forward/dq step), FUSED_SELECT (selection inside the scoring kernel or a kernel of its own), SPLIT_MASKS (block
   scoring's unmasked steps first, or every step masked), PACK_SMALL_GROUPS (groups under 16 heads: neighbouring
   queries fill the tile, or not).
   Every variant is checked against the default's output and gradients first (bf16 tolerance) and dropped if it
   disagrees.
Prints markdown; --out appends it to a file.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infllmv2 import HKV, HQ, SALA, D, emit, parse_heads  # noqa: E402  (also makes salatrain_kernels importable)

import salatrain_kernels.infllm_v2.plan as attn  # noqa: E402
from salatrain_kernels.infllm_v2 import infllmv2_attn, interface, score  # noqa: E402

PIPELINED = {"dkdv_prefetch": False, "dkdv_rows": 64, "dkdv_gather_launch": (4, 2)}
PREFETCHED = {"dkdv_prefetch": True, "dkdv_rows": 32, "dkdv_gather_launch": (4, 1)}
VARIANTS = [
    ("default", {}),
    ("local dk/dv 64 keys x 64 queries", {"dkdv_bn": 64, "dkdv_bm": 64}),
    ("local dk/dv 128 keys x 64 queries", {"dkdv_bn": 128, "dkdv_bm": 64}),
    ("local dk/dv 64 keys x 32 queries", {"dkdv_bn": 64, "dkdv_bm": 32}),
    # 8 warps at 128 keys hold one program per SM (255 registers); 64-key tiles at 4 warps fit two
    ("local dk/dv 64 keys x 64 queries, 4 warps", {"dkdv_bn": 64, "dkdv_bm": 64, "dkdv_local_launch": (4, 2)}),
    ("local dk/dv 64 keys x 32 queries, 4 warps", {"dkdv_bn": 64, "dkdv_bm": 32, "dkdv_local_launch": (4, 2)}),
    ("local dk/dv 64 keys x 32 queries, 4 warps, 3 stages", {"dkdv_bn": 64, "dkdv_bm": 32,
                                                               "dkdv_local_launch": (4, 3)}),
    ("local dk/dv 128 keys x 32 queries, 3 stages", {"dkdv_local_launch": (8, 3)}),
    ("dkdv_rows=16", {"dkdv_rows": 16}),
    ("dkdv_rows=64", {"dkdv_rows": 64}),
    ("dkdv_chunk=128", {"dkdv_chunk": 128}),
    ("dkdv_chunk=1024", {"dkdv_chunk": 1024}),
    ("dkdv_chunk=4096", {"dkdv_chunk": 4096}),
    # one program per (block, group) with all the queries that chose it: dk/dv without atomics, but heavily chosen
    # blocks (the first, at every query) make long programs
    ("dkdv_chunk=0 (a block's whole list, no atomics)", {"dkdv_chunk": 0}),
    ("dkdv_nsplit=2", {"dkdv_nsplit": 2}),
    ("dkdv_nsplit=8", {"dkdv_nsplit": 8}),
    ("blocks_per_step=2", {"blocks_per_step": 2}),
    # The gathered dk/dv kernel waits on q/dO gathers that miss L2 (ncu, 32K:
    # bench/notes/2026-12-02-h200-infllmv2-ncu-32k.md). Triton's pipeliner issues a step's gathers after the step
    # before's matmuls and waits for them at once (one gather latency per step); the default since 2026-12-03
    # prefetches: the next step's rows go out before this step's matmuls, into registers (the loop's pipeliner off),
    # the entry rows one step further (gather.py, PREFETCH), 2 queries a step, 4 warps, 1 stage. The pipelined kernel
    # (the default before: 4 queries a step, 4 warps, 2 stages) and its launches:
    ("gathered dk/dv pipelined (the default before 2026-12-03)", dict(PIPELINED)),
    ("gathered dk/dv pipelined, 2 queries a step", dict(PIPELINED, dkdv_rows=32)),
    ("gathered dk/dv pipelined, 8 warps, 2 stages", dict(PIPELINED, dkdv_gather_launch=(8, 2))),
    ("gathered dk/dv pipelined, 8 warps, 3 stages", dict(PIPELINED, dkdv_gather_launch=(8, 3))),
    ("gathered dk/dv pipelined, 4 warps, 3 stages", dict(PIPELINED, dkdv_gather_launch=(4, 3))),
    # programs of 32 of a block's 64 keys, side by side in the grid: fewer registers, more programs per SM; the two
    # halves gather the same q/dO rows at the same time (the second from L2)
    ("gathered dk/dv pipelined, 32-key programs", dict(PIPELINED, dkdv_keys=32)),
    ("gathered dk/dv pipelined, 32-key programs, 8 warps", dict(PIPELINED, dkdv_keys=32, dkdv_gather_launch=(8, 2))),
    # the prefetched kernel (the default at 16 heads a group; small groups keep the pipelined one) and its launches
    ("gathered dk/dv prefetch, 2 queries a step", dict(PREFETCHED)),
    ("gathered dk/dv prefetch, 8 warps", dict(PREFETCHED, dkdv_gather_launch=(8, 1))),
    ("gathered dk/dv prefetch, 1 query a step", dict(PREFETCHED, dkdv_rows=16)),
    ("gathered dk/dv prefetch, 32-key programs", dict(PREFETCHED, dkdv_keys=32)),
    # block scoring: the column steps every row of a tile sees whole go first, unmasked (the default since
    # 2026-12-03), or every step masked (before)
    ("block scoring with every step masked (SPLIT_MASKS off)", {"SPLIT_MASKS": False}),
    # the scoring kernel keeps each query's best blocks as it scores, no score buffer (selection.py)
    ("selection fused into the scoring kernel (FUSED_SELECT on)", {"FUSED_SELECT": True}),
    # groups of fewer than 16 heads: neighbouring queries fill the per-query tile's padding rows (plan.py)
    ("small groups packed (PACK_SMALL_GROUPS on)", {"PACK_SMALL_GROUPS": True}),
    ("small groups per-query (PACK_SMALL_GROUPS off)", {"PACK_SMALL_GROUPS": False}),
]
PLAN_FLAGS = {name: getattr(attn, name) for name in ("PACK_SMALL_GROUPS",)}
SCORE_FLAGS = {name: getattr(score, name) for name in ("SPLIT_MASKS",)}


@contextmanager
def settings(overrides: dict):
    """Within the block, every plan built inside infllmv2_attn takes these attribute values (upper-case names: the
    interface's and the plan module's settings, read while the plan is built); all restored after."""
    original = attn.AttnPlan.__init__
    interface.FUSED_SELECT = overrides.get("FUSED_SELECT", False)
    for name, default in PLAN_FLAGS.items():
        setattr(attn, name, overrides.get(name, default))
    for name, default in SCORE_FLAGS.items():
        setattr(score, name, overrides.get(name, default))

    def init(self, *a, **kw):
        original(self, *a, **kw)
        for k, v in overrides.items():
            if not k.isupper():
                setattr(self, k, v)

    attn.AttnPlan.__init__ = init
    try:
        yield
    finally:
        attn.AttnPlan.__init__ = original
        interface.FUSED_SELECT = False
        for name, default in PLAN_FLAGS.items():
            setattr(attn, name, default)
        for name, default in SCORE_FLAGS.items():
            setattr(score, name, default)


def step(q, k, v, do):
    for t in (q, k, v):
        t.grad = None
    o = infllmv2_attn(q, k, v, **SALA)
    o.backward(do)
    return o


def profile(T: int, q, k, v, do, label: str = "") -> list[str]:
    from torch.profiler import ProfilerActivity, profile as prof

    step(q, k, v, do)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step(q, k, v, do)
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(per.values())
    lines = [f"CUDA time of one forward+backward at T = {T // 1024}K{label}: {total / 1e3:.1f} ms", "",
             "| kernel | ms | share |", "|---|---|---|"]
    for name, us in sorted(per.items(), key=lambda x: -x[1])[:14]:
        lines.append(f"| `{name[:70]}` | {us / 1e3:.2f} | {us / total * 100:.1f}% |")
    return lines


def main() -> None:
    import triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="+", default=None,
                    help="time only the settings whose name contains one of these (the default is always timed)")
    ap.add_argument("--heads", default=f"{HQ},{HKV},{D}", metavar="HQ,HKV,D",
                    help="query heads, key/value heads and head dim (default SALA's; 9,3,64 is SmolLM2-135M's)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel CUDA-time breakdown")
    ap.add_argument("--profile-also", nargs="+", default=[], metavar="NAME",
                    help="also break down the settings whose name contains one of these")
    a = ap.parse_args()
    hq, hkv, d = parse_heads(a.heads)
    variants = [(n, o) for n, o in VARIANTS if n == "default" or not a.only or any(s in n for s in a.only)]
    lines = [f"## InfLLM-V2 fwd+bwd breakdown and launch settings — {torch.cuda.get_device_name()}", "",
             f"{hq} query / {hkv} key-value heads, head dim {d}, bf16, batch 1", ""]
    for T in a.T:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, T, hq, d, generator=g).cuda().bfloat16().requires_grad_()
        k, v = (torch.randn(1, T, hkv, d, generator=g).cuda().bfloat16().requires_grad_() for _ in range(2))
        do = torch.randn(1, T, hq, d, generator=g).cuda().bfloat16()
        if not a.no_profile:
            lines += profile(T, q, k, v, do) + [""]
            for name, overrides in VARIANTS:
                if any(w in name for w in a.profile_also):
                    with settings(overrides):
                        lines += profile(T, q, k, v, do, f", {name}") + [""]
        ref = [x.float() for x in (step(q, k, v, do).detach(), q.grad, k.grad, v.grad)]
        rows = ["| setting | fwd+bwd ms | vs default |", "|---|---|---|"]
        base = None
        for name, overrides in variants:
            try:
                with settings(overrides):
                    got = [x.float() for x in (step(q, k, v, do).detach(), q.grad, k.grad, v.grad)]
                    err = max(((x - y).abs().max() / y.abs().max().clamp(min=1e-6)).item() for x, y in zip(got, ref))
                    if err > 2e-2:
                        rows.append(f"| {name} | disagrees with default (rel. {err:.1e}) | |")
                        continue
                    ms = triton.testing.do_bench(lambda: step(q, k, v, do), warmup=50, rep=400)
            except Exception as e:  # a setting the kernels cannot compile: recorded, next one
                rows.append(f"| {name} | failed: {type(e).__name__} {str(e).splitlines()[0][:80] if str(e) else ''} | |")
                continue
            base = base or ms
            rows.append(f"| {name} | {ms:.2f} | {base / ms:.2f}× |")
            print(f"[sweep] T={T} {name}: {ms:.2f} ms", flush=True)
        lines += [f"Settings at T = {T // 1024}K (one changed at a time):", ""] + rows + [""]
        del q, k, v, do, ref
        torch.cuda.empty_cache()
    emit(lines, a.out)


if __name__ == "__main__":
    main()
