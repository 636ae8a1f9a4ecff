"""Decode-shaped SDPA on a GPU: one query row per head (or a GQA group's 16 heads as rows) over a key length that
grows by one each call, as in cached decoding, under torch's default dispatch and each backend forced; ms per call.
A backend that builds a plan per new shape shows here and not in fixed-shape benchmarks.

    python bench/sdpa_decode_shapes.py [--start 8192] [--steps 24]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def run(backends, q_rows, start, steps, mask):
    k = torch.randn(1, 2, start + steps, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, 2, q_rows, 64, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(steps):
        n = start + i
        m = torch.ones(1, 2, q_rows, n, device="cuda", dtype=torch.bool) if mask else None
        torch.cuda.synchronize()
        t = time.perf_counter()
        if backends is None:
            F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=m)
        else:
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=m)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=24)
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for mask in (False, True):
        for name, b in (("default", None), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                        ("efficient", [SDPBackend.EFFICIENT_ATTENTION]), ("flash", [SDPBackend.FLASH_ATTENTION]),
                        ("math", [SDPBackend.MATH])):
            try:
                ms = run(b, 16, a.start, a.steps, mask)
            except RuntimeError as e:
                ms = f"n/a ({str(e).splitlines()[0][:60]})"
            out[f"{name}{' mask' if mask else ''}"] = ms
            print(f"{name:9s} mask={mask}: {ms if isinstance(ms, str) else f'{ms:.3f} ms'}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
