"""Where InfLLM-V2's fwd+bwd wall time goes beyond its kernels' time (GPU): host work the GPU waits for.

    python bench/infllmv2_host_gaps.py [--T 32768 131072] [--out FILE]

bench_infllmv2.py times each call alone (CUDA events, a synchronisation after every call, as a user's training step
sees one layer when nothing else is queued); triton's do_bench (bench/infllmv2_sweep.py) queues calls back to back,
so host work overlaps the previous call's kernels. For SALA's shape (32 query / 2 KV heads, d128, bf16, random q/k)
this prints, per length: the median of each way of timing, the host time to enqueue one call, the kernels' summed CUDA
time and the idle gaps between them in one profiled call (the largest, with the kernels on either side), and every
host synchronisation torch's sync debug mode reports in one call.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infllmv2 as B  # noqa: E402  (also makes salatrain_kernels importable)

from salatrain_kernels.infllm_v2 import infllmv2_attn  # noqa: E402


def measure(T: int) -> list[str]:
    import triton

    q, k, v, do = B.make_inputs(T, torch.bfloat16, "cuda", "random")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def call():
        o = infllmv2_attn(*leaves, **B.SALA)
        torch.autograd.grad(o, leaves, do)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    alone = []
    for _ in range(15):
        start.record()
        call()
        end.record()
        end.synchronize()
        alone.append(start.elapsed_time(end))
    alone = sorted(alone)[len(alone) // 2]
    host = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    host = sorted(host)[len(host) // 2]
    queued = triton.testing.do_bench(call, warmup=10, rep=300)
    n = 10
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        call()
    end.record()
    end.synchronize()
    back_to_back = start.elapsed_time(end) / n

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
    lines = [f"### T = {T // 1024}K", "",
             "| timing | ms |", "|---|---|",
             f"| one call alone, events and a synchronisation around it (bench_infllmv2.py) | {alone:.2f} |",
             f"| do_bench (L2 flushed between calls, queued; infllmv2_sweep.py) | {queued:.2f} |",
             f"| {n} calls queued back to back, per call | {back_to_back:.2f} |",
             f"| host time to enqueue one call (GPU idle before it) | {host:.2f} |",
             f"| kernels' summed CUDA time, one profiled call | {busy:.2f} |",
             f"| first kernel start to last kernel end, same call | {span:.2f} |", "",
             "Largest idle gaps between kernels (µs, kernel before → kernel after):", ""]
    lines += [f"- {g:.0f} µs: `{a[:60]}` → `{b[:60]}`" for g, a, b in gaps]
    lines += ["", f"Host synchronisations in one call: {len(syncs)}"] + [f"- {s}" for s in syncs[:12]] + [""]
    return lines


def main() -> None:
    B.run_lengths(__doc__, "InfLLM-V2 fwd+bwd: kernels against wall time", measure)


if __name__ == "__main__":
    main()
