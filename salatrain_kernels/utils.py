"""What every kernel module shares: backend resolution, the interpreter switch, test poisoning, launch helpers
(next_pow2, dot precision, autotuned launches) and the reductions used inside kernels.

Triton runs on CPU only under its interpreter (``TRITON_INTERPRET=1``, set before the kernel modules are
imported: ``@triton.jit`` reads it). ``POISON`` (tests; ``SALATRAIN_KERNELS_POISON=1``) fills every buffer a
kernel is meant to overwrite with NaN (INT_MIN for integers), so an element a kernel forgets to write shows.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
LOG2E = 1.0 / math.log(2.0)
POISON = os.environ.get("SALATRAIN_KERNELS_POISON", "0") == "1"
TUNE_MIN_ROWS = 16384


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor, extra: tuple[str, ...] = ()) -> str:
    """'auto' -> 'triton' for CUDA tensors, 'torch' (the PyTorch reference) elsewhere; `extra` names further
    backends a caller accepts. 'triton' on CPU tensors needs the interpreter."""
    choices = BACKENDS + tuple(extra)
    if backend not in choices:
        raise ValueError(f"backend must be one of {', '.join(choices)}; got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and not interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing)")
    return backend


def new_empty(shape, dtype, device) -> torch.Tensor:
    """torch.empty, or a poisoned tensor when POISON is set."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)


def device_guard(t: torch.Tensor):
    """Launch on t's GPU even when another one is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tf32 would change which blocks win); 16-bit inputs use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


class Tunable:
    """A @triton.jit kernel and an autotuned twin over (num_warps, num_stages) candidates. The twin runs only
    where speed matters (`should_tune`); everything else (tests, fp32, small groups, short sequences) runs one
    fixed setting, so it compiles one variant and never benchmarks. Arguments are passed by keyword."""

    def __init__(self, kernel, options: list[tuple[int, int]], key: list[str]):
        self.kernel, self.options = kernel, options
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in options]
        self.tuned = triton.autotune(configs=configs, key=key)(kernel)

    def launch(self, grid, tune: bool, *, default: tuple[int, int] | None = None, **kwargs):
        if tune and not interpreting():
            self.tuned[grid](**kwargs)
        else:
            warps, stages = default or self.options[0]
            self.kernel[grid](**kwargs, num_warps=warps, num_stages=stages)


def should_tune(q_rows: torch.Tensor, group: int) -> bool:
    """The production path: CUDA, 16-bit inputs, G >= 16, at least TUNE_MIN_ROWS query rows."""
    return q_rows.is_cuda and q_rows.dtype != torch.float32 and group >= 16 and q_rows.shape[0] >= TUNE_MIN_ROWS


# Reductions used inside the kernels. Compiled: the triton.language ones. Interpreted (CPU tests): the same
# reduction through tl.reduce / tl.associative_scan with the standard combine functions, which the interpreter
# runs in numpy directly; calling the @jit wrappers would re-patch the language on every call (~5 ms each).
if interpreting():

    def row_sum(x, axis):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    def row_max(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    def row_min(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_min)

    def row_cumsum(x, axis):
        return tl.associative_scan(x, axis, tl.standard._sum_combine)

else:
    row_sum, row_max, row_min, row_cumsum = tl.sum, tl.max, tl.min, tl.cumsum
