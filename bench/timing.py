"""Timing shared by the small bench scripts: median milliseconds of a GPU step, CUDA events around each call."""
from __future__ import annotations

import torch


def median_ms(step, reps: int, warmup: int = 3) -> float:
    """Median over ``reps`` calls of ``step()`` after ``warmup`` untimed ones, the device synchronised per call."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
