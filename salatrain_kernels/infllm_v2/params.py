"""InfLLM-V2 settings, argument checks, and the block geometries the Triton kernels take.

The geometry rule lives here only: the model asks ``triton_geometry_problem`` (when salatrain_kernels is
importable) to decide whether a sparse layer can use the kernels at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils import next_pow2
from .naive import all_visible_len, check_rules

ATTENTION_RULE = "a power-of-two block_size >= 16"
SCORING_RULE = ("kernel_stride dividing block_size (power-of-two ratio) and kernel_size, and "
                "kernel_size <= block_size + kernel_stride")


def triton_scoring_ok(block_size: int, kernel_size: int, kernel_stride: int) -> bool:
    """Scoring kernel: stride | block_size (power-of-two ratio), stride | kernel_size, windows span <= 2 blocks."""
    ratio = block_size // kernel_stride
    return (
        block_size % kernel_stride == 0
        and ratio == next_pow2(ratio)
        and kernel_size % kernel_stride == 0
        and kernel_size <= block_size + kernel_stride
    )


def triton_attention_ok(block_size: int) -> bool:
    return block_size >= 16 and block_size == next_pow2(block_size)


def triton_geometry_problem(block_size: int, kernel_size: int, kernel_stride: int) -> str | None:
    """None when the Triton kernels (scoring, selection, attention) take this block geometry; else what they need."""
    if triton_scoring_ok(block_size, kernel_size, kernel_stride) and triton_attention_ok(block_size):
        return None
    return (f"block_size={block_size}, kernel_size={kernel_size}, kernel_stride={kernel_stride}: the Triton "
            f"InfLLM-V2 kernels need {ATTENTION_RULE}, {SCORING_RULE}")


@dataclass(frozen=True)
class SparseParams:
    """InfLLM-V2 settings (defaults: MiniCPM4 / SALA; dense_len_mode and local_blocks: salatrain's forms of the two
    rules, "sequence" / "block" are MiniCPM-SALA's released ones, see naive.py)."""

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    topk: int = 64
    window_size: int = 2048
    dense_len: int = 8192
    normalizer: str = "exact"
    coarse_kernel_size: int | None = None
    coarse_kernel_stride: int | None = None
    dense_len_mode: str = "position"
    local_blocks: str = "token"

    def __post_init__(self):
        for name in ("block_size", "kernel_size", "kernel_stride", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("init_blocks", "window_size", "dense_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.normalizer not in ("exact", "coarse"):
            raise ValueError(f"normalizer must be 'exact' or 'coarse', got {self.normalizer!r}")
        check_rules(self.dense_len_mode, self.local_blocks)

    @property
    def num_selected(self) -> int:
        """K: blocks visible to one sparse query (topk chosen incl. init + the local window's blocks)."""
        return self.topk + self.window_size // self.block_size

    @property
    def all_visible_len(self) -> int:
        """Rows below this position see every block (naive.all_visible_len)."""
        return all_visible_len(self.block_size, self.topk, self.window_size)

    @property
    def coarse(self) -> tuple[int, int]:
        """(kernel, stride) of the coarse compression that provides the 'coarse' softmax normaliser."""
        return (self.coarse_kernel_size or 4 * self.kernel_size, self.coarse_kernel_stride or 4 * self.kernel_stride)

    def geometry_problem(self) -> str | None:
        return triton_geometry_problem(self.block_size, self.kernel_size, self.kernel_stride)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cu_seqlens) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch/head_dim mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if q.dtype != k.dtype or (v is not None and v.dtype != k.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {None if v is None else v.dtype}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"Tq={q.shape[1]} must be <= Tk={k.shape[1]} (queries are the last Tq positions)")
    if cu_seqlens is not None:
        if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
            raise ValueError("cu_seqlens needs B = 1 and Tq = Tk")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [N+1]")
