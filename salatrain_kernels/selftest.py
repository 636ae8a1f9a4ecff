"""Start-up self-test: each Triton kernel against its PyTorch reference on a small case of the caller's shapes.

The model runs it once per (kernel, device, dtype, head shape) before its first CUDA forward and stops with
a clear error if the kernel disagrees (a broken Triton build, an unsupported card, a miscompiled config).
Forward and gradients are compared by relative error ‖out − ref‖ / ‖ref‖ against an fp32 reference.
"""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class KernelSelfTestError(RuntimeError):
    pass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def _compare(name, fn, ref, inputs, dtype, generator):
    """Run fn and ref on the same inputs (ref in fp32); compare outputs and input gradients. Random numbers
    come from ``generator`` only, so the caller's RNG streams (dropout under activation checkpointing) are
    left as they were."""
    lo = [x.detach().to(dtype).requires_grad_(x.is_floating_point()) for x in inputs]
    hi = [x.detach().float().requires_grad_(x.is_floating_point()) for x in inputs]
    out, expected = fn(*lo), ref(*hi)
    g = torch.randn(expected.shape, device=expected.device, generator=generator)
    (out.float() * g).sum().backward()
    (expected * g).sum().backward()
    checks = {"output": (out, expected)}
    checks.update({f"grad[{i}]": (a.grad, b.grad) for i, (a, b) in enumerate(zip(lo, hi)) if b.grad is not None})
    _check(name, checks, dtype)


def _check(name, checks, dtype):
    """checks: {what: (kernel's tensor, fp32 reference's)}; raises KernelSelfTestError on the first mismatch."""
    tol = TOLERANCE[dtype]
    for what, (a, b) in checks.items():
        if a is None or not torch.isfinite(a).all() or _rel(a, b) > tol:
            err = "non-finite or missing" if a is None or not torch.isfinite(a).all() else f"{_rel(a, b):.2e}"
            raise KernelSelfTestError(
                f"{name} self-test failed on {_device_name(b.device)}: "
                f"{what} relative error {err} > {tol:.0e} ({dtype}); run with kernel backend 'torch' "
                "(model.set_kernel_backend('torch')) and report this"
            )


def self_test(what: str, *, device, dtype, num_heads: int = 4, num_kv_heads: int = 1, head_dim: int = 64,
              seq_len: int = 200, dense_len_mode: str = "position", local_blocks: str = "token") -> None:
    """``what`` is "lightning_attn", "infllmv2_attn" or "rms_norm"; raises KernelSelfTestError on mismatch. ``seq_len``
    (Lightning) spans several chunks; InfLLM-V2 always uses 512 tokens so that its sparse path runs, under the
    selection rules ``dense_len_mode`` and ``local_blocks`` (the caller's, which select the kernel variants).

    It runs its own forward and backward, so it needs grad mode and must not run inside another autograd
    context (``no_grad``, ``inference_mode``, an activation-checkpointed region): call it from a thread of its
    own, as the model does (``run_isolated`` in the modeling file)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    if what == "lightning_attn":
        from .lightning import lightning_attn, lightning_attn_torch

        h = min(num_heads, 8)
        shape = (1, seq_len, h, head_dim)
        inputs = [torch.randn(shape, device=device, generator=g) for _ in range(3)]
        decay = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device=device)
        _compare(what, lambda q, k, v: lightning_attn(q, k, v, decay, backend="triton")[0],
                 lambda q, k, v: lightning_attn_torch(q, k, v, decay)[0], inputs, dtype, g)
        from .lightning import fused

        w = [1 + 0.1 * torch.randn(head_dim, device=device, generator=g) for _ in range(2)]
        pos = torch.arange(shape[1], device=device, dtype=torch.float32)
        ang = pos[:, None] / (10000.0 ** (torch.arange(0, head_dim, 2, device=device) / head_dim))
        cos, sin = torch.cat([ang, ang], -1).cos()[None], torch.cat([ang, ang], -1).sin()[None]
        for i, name in enumerate(("q", "k")):
            _compare(f"{what} (fused norm+RoPE, {name})",
                     lambda q, k: fused.qk_norm_rope(q, k, w[0].to(q.dtype), w[1].to(q.dtype), cos.to(q.dtype),
                                                     sin.to(q.dtype), 1e-6, backend="triton")[i],
                     lambda q, k: fused.qk_norm_rope_torch(q, k, w[0], w[1], cos, sin, 1e-6)[i],
                     inputs[:2], dtype, g)
        n = h * head_dim
        ow = 1 + 0.1 * torch.randn(n, device=device, generator=g)
        _compare(f"{what} (fused norm+gate)",
                 lambda o, z: fused.out_norm_gate(o, z, ow.to(o.dtype), 1e-6, backend="triton"),
                 lambda o, z: fused.out_norm_gate_torch(o, z, ow, 1e-6),
                 [torch.randn(1, shape[1], n, device=device, generator=g) for _ in range(2)], dtype, g)
    elif what == "rms_norm":  # forward only (the kernel serves inference); head_dim is the normalised width
        from .lightning import fused

        x = torch.randn(3, head_dim, device=device, generator=g)
        w = 1 + 0.1 * torch.randn(head_dim, device=device, generator=g)
        with torch.no_grad():
            out = fused.rms_norm(x.to(dtype), w.to(dtype), 1e-6, backend="triton")
        _check(f"{what} (forward)", {"output": (out, fused.rms_norm_hf(x, w, 1e-6))}, dtype)
    elif what == "infllmv2_attn":
        from .infllm_v2 import infllmv2_attn, infllmv2_attn_torch

        params = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=2, window_size=64,
                      dense_len=128, dense_len_mode=dense_len_mode, local_blocks=local_blocks)
        t = 512
        q = torch.randn(1, t, num_heads, head_dim, device=device, generator=g)
        k, v = (torch.randn(1, t, num_kv_heads, head_dim, device=device, generator=g) for _ in range(2))
        _compare(what, lambda q, k, v: infllmv2_attn(q, k, v, backend="triton", **params),
                 lambda q, k, v: infllmv2_attn_torch(q, k, v, **params), [q, k, v], dtype, g)
    else:
        raise ValueError(f"unknown kernel {what!r}")
