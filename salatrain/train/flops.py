"""Model FLOPs per trained token (for MFU) and the device's measured bf16 matmul peak.

Per token, forward: 2 FLOPs per weight of every linear layer (LM head included, embeddings excluded) plus the
mixers' own work at sequence length T (H heads of dim D):

    full_attention    4·H·D·k̄        k̄ = mean keys per query (causal, sliding window if any)
    sparse_attention  4·H·D·k̄ + 2·HKV·G·D·T̄/stride   keys: all before dense_len, then the visible blocks;
                                                       the second term scores the compressed keys
    linear_attention  H·(2·D·C + 4·D²)  chunk C: intra-chunk attention, state read and update

Training counts 3× the forward of what trains and 1× the forward of frozen models (the teacher);
recomputation under activation checkpointing is not counted (the usual MFU convention).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..models import SalaHybridConfig


def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _mean_keys(seq_len: int, window: int | None) -> float:
    t = torch.arange(1, seq_len + 1, dtype=torch.float64)
    return float(t.clamp(max=window).mean()) if window else float(t.mean())


def mixer_flops(config: SalaHybridConfig, seq_len: int, sparse_on: bool = True) -> float:
    """Forward FLOPs per token of every layer's mixer (beyond its projections)."""
    h, d = config.num_attention_heads, config.head_dim
    sc, lc = config.sparse_config, config.lightning_config
    total = 0.0
    for i, mixer in enumerate(config.mixer_types):
        if mixer == "full_attention":
            total += 4 * h * d * _mean_keys(seq_len, config.sliding_windows[i])
        elif mixer == "linear_attention":
            total += h * (2 * d * lc["chunk_size"] + 4 * d * d)
        else:
            visible = (sc["topk"] + sc["window_size"] // sc["block_size"]) * sc["block_size"]
            dense_len = sc["dense_len"] if sparse_on else seq_len
            t = torch.arange(1, seq_len + 1, dtype=torch.float64)
            keys = torch.where(t <= dense_len, t, t.clamp(max=visible))
            scoring = torch.where(t <= dense_len, 0.0, 2 * d * t / sc["kernel_stride"])
            total += float((4 * h * d * keys + h * scoring).mean())
    return total


def train_flops_per_token(student: nn.Module, student_config: SalaHybridConfig, seq_len: int, sparse_on: bool,
                          frozen: nn.Module | None = None, frozen_config: SalaHybridConfig | None = None) -> float:
    fwd = 2 * linear_params(student) + mixer_flops(student_config, seq_len, sparse_on)
    flops = 3 * fwd
    if frozen is not None:
        flops += 2 * linear_params(frozen) + mixer_flops(frozen_config, seq_len, sparse_on)
    return flops


def measure_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float | None:
    """bf16 matmul TFLOP/s of one device (None on CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12
