"""Timing and memory on the device `salatrain bench` runs on: CUDA events or the wall clock, CUDA's allocator
peak or the process's peak resident memory, and what counts as running out of memory."""

from __future__ import annotations

import gc
import os
import time

import torch


class Clock:
    """Seconds between start() and stop(): CUDA events after a synchronisation on CUDA, the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._start.elapsed_time(end) / 1000.0
        return time.perf_counter() - self._t0


class PeakMemory:
    """Peak memory since reset(): ``torch.cuda.max_memory_allocated`` on CUDA (weights included); on CPU the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs; where that cannot be reset, the
    peak since the process started)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.what = "torch.cuda.max_memory_allocated"
        elif os.access("/proc/self/clear_refs", os.W_OK):
            self.what = "peak resident memory of the process (VmHWM)"
        else:
            self.what = "peak resident memory since the process started (VmHWM could not be reset)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, CPU allocation failures (a RuntimeError from the allocator) and MemoryError."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = None
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), None)
    except OSError:
        pass
    import platform

    return f"{name or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
