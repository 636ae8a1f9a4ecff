"""Memory a `salatrain bench` run needs, estimated from config.json and the safetensors headers before any
weights load, and the memory the device offers.

estimate = weights + cache at (length + decode tokens) + the activations of one layer's forward over one prefill
chunk (hidden states, q/k/v, the MLP's intermediates, fp32 Lightning temporaries, one K/V copy as the cache
grows). It is an approximation meant to refuse what clearly cannot fit; a run that still runs out of memory is
reported as OOM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..hf_checkpoint import CheckpointDir

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json (and the number of weights from the safetensors headers)."""

    num_params: int
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    kv_layers: int  # layers that keep K/V per token (softmax and sparse attention)
    state_layers: int  # Lightning layers (a fixed fp32 state per head)

    @classmethod
    def of(cls, ckpt: CheckpointDir) -> ModelShape:
        c = ckpt.config
        c = c.get("text_config", c) if "num_hidden_layers" not in c else c
        num_params = sum(_numel(s) for s in ckpt.shapes().values())
        layers = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
        mixers = c.get("mixer_types") or ["full_attention"] * layers
        linear = sum(m == "linear_attention" for m in mixers)
        return cls(num_params, layers, int(c["hidden_size"]), int(c["intermediate_size"]), heads,
                   int(c.get("num_key_value_heads") or heads), head_dim, int(c["vocab_size"]), layers - linear, linear)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations

    def describe(self) -> str:
        return (f"~{self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, cache {self.cache / GIB:.1f}, "
                f"activations {self.activations / GIB:.1f})")


def estimate(shape: ModelShape, length: int, batch: int, elem: int, decode_tokens: int,
             prefill_chunk: int | None) -> MemoryEstimate:
    """Bytes one prefill of ``length`` tokens (``batch`` rows, ``elem`` bytes per value) plus decoding needs."""
    s = shape
    keys = length + decode_tokens
    kv_per_layer = 2 * batch * keys * s.num_kv_heads * s.head_dim * elem
    cache = s.kv_layers * kv_per_layer + s.state_layers * batch * s.num_heads * s.head_dim * s.head_dim * 4
    c = min(length, prefill_chunk or length)
    per_token = elem * (3 * s.hidden + 4 * s.intermediate + 2 * (s.num_heads + 2 * s.num_kv_heads) * s.head_dim)
    if s.state_layers:
        per_token += 4 * s.num_heads * max(s.head_dim, 64) * 2
    activations = batch * c * per_token + (kv_per_layer if s.kv_layers else 0) + batch * s.vocab * 4
    return MemoryEstimate(s.num_params * elem, cache, activations)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(free bytes, how they were measured) on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "free CUDA memory"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "available host memory"
