"""Where InfLLM-V2's fwd+bwd wall time goes beyond its kernels' time (GPU): host work the GPU waits for.

    python bench/infllmv2_host_gaps.py [--T 32768 131072] [--out FILE]

bench_infllmv2.py times each call alone (CUDA events, a synchronisation after every call, as a user's training step
sees one layer when nothing else is queued); triton's do_bench (bench/infllmv2_sweep.py) queues calls back to back,
so host work overlaps the previous call's kernels. For SALA's shape (32 query / 2 KV heads, d128, bf16, random q/k)
this prints, per length: the call timed alone with the layout's host tables built in every call against kept from
the call before (layout.LAYOUT_CACHE_SIZE), alternated; then, with them kept, the median of each way of timing, the
host time to enqueue one call, the kernels' summed CUDA time and the idle gaps between them in one profiled call
(the largest, with the kernels on either side), every host synchronisation torch's sync debug mode reports in one
call, and the host functions that take the time of one call (cProfile).
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infllmv2 as B  # noqa: E402  (also makes salatrain_kernels importable)
from timing import median_ms  # noqa: E402

from salatrain_kernels.infllm_v2 import infllmv2_attn  # noqa: E402


def _host_ms(fn, reps: int = 5) -> float:
    """Median host ms to enqueue fn() with the GPU idle before it."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def _host_profile(fn, top: int = 14) -> list[str]:
    """Our functions by cumulative host time in one call (cProfile; the GPU idle before it)."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = sorted(((v[3] * 1e3, v[1], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.items()
                   if "salatrain_kernels" in k[0] or "triton" in k[0] or k[0] == "~"), reverse=True)
    return ["| host function (cumulative) | ms | calls |", "|---|---|---|"] + [
        f"| `{name}` | {ms:.2f} | {calls} |" for ms, calls, name in rows[:top]]


def measure(T: int) -> list[str]:
    import triton

    from salatrain_kernels.infllm_v2 import layout as layout_mod

    q, k, v, do = B.make_inputs(T, torch.bfloat16, "cuda", "random")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def call():
        o = infllmv2_attn(*leaves, **B.SALA)
        torch.autograd.grad(o, leaves, do)

    def forward():
        with torch.no_grad():
            infllmv2_attn(*leaves, **B.SALA)

    # the layout's tables built in every call (LAYOUT_CACHE_SIZE 0) against kept from the call before; alternated
    rounds = {0: [], layout_mod.LAYOUT_CACHE_SIZE or 8: []}
    for _ in range(2):
        for size, got in rounds.items():
            layout_mod.LAYOUT_CACHE_SIZE = size
            layout_mod.clear_layout_cache()
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            got.append((median_ms(call, 15, 0), median_ms(forward, 15, 0), _host_ms(call), _host_ms(forward)))
    lines = [f"### T = {T // 1024}K", "",
             "| the layout's tables | fwd+bwd alone | forward alone | host time to enqueue fwd+bwd | ... forward |",
             "|---|---|---|---|---|"]
    for size, got in rounds.items():
        what = "built in every call" if size == 0 else f"kept from the call before (LAYOUT_CACHE_SIZE={size})"
        lines.append(f"| {what} | " + " | ".join(" / ".join(f"{r[i]:.2f}" for r in got) for i in range(4)) + " |")
    lines += ["", "(ms; two alternated rounds each)", ""]
    alone = sorted(r[0] for r in rounds[layout_mod.LAYOUT_CACHE_SIZE])[0]
    queued = triton.testing.do_bench(call, warmup=10, rep=300)
    n = 10
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        call()
    end.record()
    end.synchronize()
    back_to_back = start.elapsed_time(end) / n
    host = _host_ms(call)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
        call()
        torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in p.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda x: x[0])
    busy = sum(e - s for s, e, _ in kernels) / 1e3
    span = (kernels[-1][1] - kernels[0][0]) / 1e3 if kernels else 0.0
    gaps = sorted(((kernels[i + 1][0] - kernels[i][1], kernels[i][2], kernels[i + 1][2])
                   for i in range(len(kernels) - 1)), reverse=True)[:6]
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:80]}" for w in caught
             if "synchroniz" in str(w.message).lower()]
    lines += ["With the tables kept:", "",
              "| timing | ms |", "|---|---|",
              f"| one call alone, events and a synchronisation around it, best round | {alone:.2f} |",
              f"| do_bench (L2 flushed between calls, queued; infllmv2_sweep.py) | {queued:.2f} |",
              f"| {n} calls queued back to back, per call | {back_to_back:.2f} |",
              f"| host time to enqueue one call (GPU idle before it) | {host:.2f} |",
              f"| kernels' summed CUDA time, one profiled call | {busy:.2f} |",
              f"| first kernel start to last kernel end, same call | {span:.2f} |", "",
              "Largest idle gaps between kernels (µs, kernel before → kernel after):", ""]
    lines += [f"- {g:.0f} µs: `{a[:60]}` → `{b[:60]}`" for g, a, b in gaps]
    lines += ["", f"Host synchronisations in one call: {len(syncs)}"] + [f"- {s}" for s in syncs[:12]] + [""]
    lines += ["Host time of one fwd+bwd by function:", ""] + _host_profile(call) + [""]
    return lines


def main() -> None:
    B.run_lengths(__doc__, "InfLLM-V2 fwd+bwd: kernels against wall time", measure)


if __name__ == "__main__":
    main()
