"""How the sparse op's dense prefix should call torch SDPA: fwd+bwd time of candidate layouts on one GPU.

The sparse op receives q/k/v as ``[B, T, H, D]`` and hands rows below ``dense_len`` (and fully dense short
sequences) to torch's causal SDPA. torch picks its backend from the layout it is given: transposed views go to
FlashAttention-2, contiguous ``[B, H, T, D]`` tensors to cuDNN on an H200. Each candidate is timed end to end,
including its own copies, so the table says what the op would actually pay.

    python bench/dense_prefix.py --out bench/notes/dense_prefix.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from timing import median_ms


def views_repeat(q, k, v, scale):
    """K/V heads repeated, SDPA on transposed views (the op's first form)."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale)
    return out.transpose(1, 2)


def contiguous_gqa(q, k, v, scale):
    """Contiguous [B, H, T, D] copies and enable_gqa: torch's default dispatch, no repeated K/V."""
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def contiguous_repeat(q, k, v, scale):
    """Contiguous [B, H, T, D] copies with K/V heads repeated."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).contiguous()
    kh, vh = (x.transpose(1, 2).repeat_interleave(group, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return out.transpose(1, 2)


def views_gqa(q, k, v, scale):
    """Transposed views with enable_gqa."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


CANDIDATES = {f.__name__: f for f in (views_repeat, contiguous_gqa, contiguous_repeat, views_gqa)}


def time_ms(fn, q, k, v, grad, reps):
    def step():
        out = fn(q, k, v, q.shape[-1] ** -0.5)
        torch.autograd.grad(out, (q, k, v), grad)
    return median_ms(step, reps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for t in args.lengths:
        g = torch.Generator(device=dev).manual_seed(t)
        q = torch.randn(1, t, args.heads, args.dim, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
        k, v = (torch.randn(1, t, args.kv_heads, args.dim, device=dev, dtype=torch.bfloat16, generator=g)
                .requires_grad_() for _ in range(2))
        grad = torch.randn_like(q)
        ref = views_repeat(q, k, v, args.dim ** -0.5).float()
        row = {"T": t}
        for name, fn in CANDIDATES.items():
            err = (fn(q, k, v, args.dim ** -0.5).float() - ref).abs().max().item()
            row[name] = {"ms": round(time_ms(fn, q, k, v, grad, args.reps), 3), "max_abs_diff": err}
        rows.append(row)
        print(t, {n: row[n]["ms"] for n in CANDIDATES}, flush=True)
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": args.heads,
              "kv_heads": args.kv_heads, "dim": args.dim, "batch": 1, "dtype": "bfloat16",
              "timing": f"fwd+bwd median of {args.reps}, CUDA events, including each candidate's copies",
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
