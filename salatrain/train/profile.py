"""Where a training step's time goes: ``trainer.profile_steps=[first,last]``.

Steps first..last run with the device synchronised at every phase boundary and each phase timed (data,
forward with its student / teacher / loss parts, backward, optimizer, host synchronisation); the step after
``last`` runs under ``torch.profiler`` and its device kernels are summed by kind (matmul, Lightning kernels,
InfLLM-V2 kernels, softmax attention, logit loss, NCCL communication, elementwise and the rest), counted, and
set against that step's wall time: the share of it the device was busy (union of the kernels' intervals) says
whether the host keeps up. The same step counts the host synchronisations torch reports (its CUDA sync debug
mode: ``.item()``, ``nonzero``, boolean indexing, copies to the host ...) by the line of salatrain or DeepSpeed
that caused them: each one drains the device's queue, so the host can no longer run ahead of the device.
Synchronising costs a little overlap, so the phases add up to slightly more than an unprofiled step; tokens/s
in metrics.jsonl of the other steps is the throughput. Written to ``output_dir/profile.json`` and
``profile.md``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import traceback
import warnings
from pathlib import Path

import torch

KINDS = [  # first match wins, on the kernel's name
    ("communication (NCCL)", r"nccl"),  # ZeRO's gradient reduction, sequence parallelism's all-to-alls
    ("logit loss", r"logit_loss"),
    ("Lightning kernels", r"lightning|_scan|_chunk_|qk_norm_rope|out_norm_gate"),
    ("InfLLM-V2 kernels", r"infllm|_gather|_window|_score|_select|block_attn"),
    ("softmax attention (flash/cuDNN)", r"flash|fmha|cudnn|attention|sdpa"),
    ("matmul", r"gemm|cutlass|nvjet|sm90_xmma|xmma|matmul|ampere_|hopper"),
    ("optimizer (multi-tensor)", r"multi_tensor|adam|foreach"),
    ("copies and casts", r"copy|cast|convert|Memcpy|Memset|fill"),
    ("reductions", r"reduce|norm|sum|softmax|max"),
]

_ACTIVE: "StepProfiler | None" = None


def phase(name: str):
    """Time the enclosed block as phase ``name`` when a profiled step is running (nested phases are named
    parent/child); otherwise nothing."""
    return _ACTIVE.phase(name) if _ACTIVE is not None and _ACTIVE.timing else contextlib.nullcontext()


def kind_of(kernel: str) -> str:
    low = kernel.lower()
    for kind, pattern in KINDS:
        if re.search(pattern.lower(), low):
            return kind
    return "elementwise and other"


class StepProfiler:
    def __init__(self, steps, device: torch.device, out_dir: Path, tokens_per_step: int):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.device, self.out_dir, self.tokens = device, Path(out_dir), tokens_per_step
        self.timing = False
        self.times: dict[str, float] = {}
        self.stack: list[str] = []
        self.steps_timed = 0
        self.kernels: dict[str, float] = {}
        self.launches = 0
        self.busy_s = 0.0  # union of the traced step's kernel intervals
        self.traced_wall_s = 0.0
        self.syncs: dict[str, int] = {}  # host synchronisations of the traced step, by causing line
        self._show_other = warnings.showwarning  # where other warnings go while they are being counted

    @property
    def enabled(self) -> bool:
        return self.last >= self.first > 0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        self.stack.append(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            key = "/".join(self.stack)
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0
            self.stack.pop()

    @contextlib.contextmanager
    def step(self, step: int):
        """Wrap one optimizer step of the loop."""
        global _ACTIVE
        if not self.enabled or step < self.first or step > self.last + 1:
            yield
            return
        _ACTIVE = self
        self.timing = step <= self.last
        try:
            if self.timing:
                with self.phase("step"):
                    yield
                self.steps_timed += 1
            else:
                self._sync()
                t0 = time.perf_counter()
                with torch.profiler.profile(activities=self._activities()) as prof:
                    with self.count_syncs():
                        yield
                    self._sync()
                    self.traced_wall_s = time.perf_counter() - t0
                self._collect(prof.events())
                self.write()
        finally:
            _ACTIVE = None
            self.timing = False

    @contextlib.contextmanager
    def count_syncs(self):
        """Count the host synchronisations torch reports inside the block (CUDA devices only), by site."""
        if self.device.type != "cuda":
            yield
            return
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings():
            self._show_other = warnings.showwarning
            warnings.simplefilter("always")
            warnings.showwarning = self._on_warning
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(before)

    def _on_warning(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):  # any other warning is shown as it would have been
            self._show_other(message, category, filename, lineno, file, line)
            return
        site = sync_site(traceback.extract_stack()[:-1]) or f"{Path(filename).name}:{lineno}"
        self.syncs[site] = self.syncs.get(site, 0) + 1

    def _activities(self):
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        return acts

    def _collect(self, events) -> None:
        """Sum the device events of the traced step: kernels, memcpy, memset. Ranges that ``record_function``
        marks on the device timeline (``Optimizer.step#AdamW.step``) are annotations over kernels, not kernels."""
        cuda = torch.autograd.DeviceType.CUDA
        spans = []
        for evt in events:
            if evt.device_type != cuda or getattr(evt, "is_user_annotation", False):
                continue
            r = evt.time_range
            self.kernels[evt.name] = self.kernels.get(evt.name, 0.0) + r.elapsed_us() / 1e6
            self.launches += 1
            spans.append((r.start, r.end))
        end = float("-inf")
        for a, b in sorted(spans):  # kernels of several streams overlap: count busy time once
            if b > end:
                self.busy_s += (b - max(a, end)) / 1e6
                end = b

    def summary(self) -> dict:
        n = max(self.steps_timed, 1)
        phases = {k: v / n for k, v in sorted(self.times.items(), key=lambda kv: kv[0])}
        kinds: dict[str, float] = {}
        for name, sec in self.kernels.items():
            kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + sec
        top = sorted(self.kernels.items(), key=lambda kv: -kv[1])[:25]
        step = phases.get("step", 0.0)
        return {"steps_timed": self.steps_timed, "tokens_per_step": self.tokens,
                "synchronised_tokens_per_s": self.tokens / step if step else None,
                "phase_seconds_per_step": phases, "kernel_seconds_by_kind": dict(sorted(kinds.items(),
                                                                                        key=lambda kv: -kv[1])),
                "top_kernels_seconds": dict(top), "kernel_launches": self.launches,
                "device_busy_seconds": self.busy_s, "traced_step_wall_seconds": self.traced_wall_s,
                "host_syncs": dict(sorted(self.syncs.items(), key=lambda kv: -kv[1]))}

    def write(self) -> None:
        s = self.summary()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "profile.json").write_text(json.dumps(s, indent=2))
        step = s["phase_seconds_per_step"].get("step", 0.0) or 1.0
        lines = [f"profiled steps: {s['steps_timed']} (synchronised at phase boundaries), "
                 f"{self.tokens} tokens per step", "", "| phase | ms per step | share |", "|---|---|---|"]
        for k, v in s["phase_seconds_per_step"].items():
            lines.append(f"| {k} | {v * 1e3:.1f} | {v / step:.0%} |")
        total = sum(s["kernel_seconds_by_kind"].values()) or 1.0
        lines += ["", "| device kernels (one step, torch.profiler) | ms | share |", "|---|---|---|"]
        for k, v in s["kernel_seconds_by_kind"].items():
            lines.append(f"| {k} | {v * 1e3:.1f} | {v / total:.0%} |")
        if s["kernel_launches"]:
            wall = s["traced_step_wall_seconds"]
            lines += ["", f"traced step: {s['kernel_launches']} device operations, mean "
                          f"{sum(self.kernels.values()) / s['kernel_launches'] * 1e6:.0f} µs each; device busy "
                          f"{s['device_busy_seconds'] * 1e3:.1f} ms of the step's {wall * 1e3:.1f} ms "
                          f"({s['device_busy_seconds'] / wall:.0%}; torch.profiler slows the host, so an unprofiled "
                          "step idles less)" if wall else ""]
        if s["host_syncs"]:
            lines += ["", f"host synchronisations in the traced step: {sum(s['host_syncs'].values())}", "",
                      "| caused at | count |", "|---|---|"]
            lines += [f"| `{k}` | {v} |" for k, v in s["host_syncs"].items()]
        lines += ["", "| top kernels | ms |", "|---|---|"]
        for k, v in s["top_kernels_seconds"].items():
            lines.append(f"| `{k[:90]}` | {v * 1e3:.2f} |")
        (self.out_dir / "profile.md").write_text("\n".join(lines) + "\n")


def _package_roots() -> list[Path]:
    import sys

    return [Path(m.__file__).parent for name in ("salatrain", "salatrain_kernels", "deepspeed")
            if (m := sys.modules.get(name)) is not None and getattr(m, "__file__", None)]


def sync_site(stack) -> str | None:
    """The innermost frame of salatrain (other than this file), its kernels or DeepSpeed in ``stack`` (a list of
    traceback.FrameSummary, outermost first), as ``folder/file.py:line (function)``."""
    roots = _package_roots()
    for fr in reversed(stack):
        path = Path(fr.filename)
        if path != Path(__file__) and any(root in path.parents for root in roots):
            return f"{path.parent.name}/{path.name}:{fr.lineno} ({fr.name})"
    return None
