"""Softmax attention of a packed training batch: torch's varlen FlashAttention (what the model runs for packed
documents) against dense causal SDPA on the same rows (what it could run for rows holding a single document),
and torch's cuDNN attention on the packed documents (aten._cudnn_attention_forward with cumulative lengths,
the op nested tensors use), checked against the varlen call forward and backward before it is timed.

The shape defaults to SmolLM2-135M's distillation batch: 16 rows of 4096 tokens, 9 query / 3 KV heads of 64,
bf16. Documents have exponentially distributed lengths (mean --mean-doc tokens), packed end to end and cut into
rows; every row start is a document start for the varlen call. Each candidate is timed fwd+bwd (median of
--reps, CUDA events), each paying for its own copies. The dense rows ignore document boundaries: they time the
ceiling a single-document row could reach, not an equal computation.

    python bench/sdpa_varlen.py --out bench/notes/sdpa_varlen.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import random

import torch
import torch.nn.functional as F
from timing import median_ms
from torch.nn.attention import SDPBackend, sdpa_kernel


def packed_bounds(rows: int, seq: int, mean_doc: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    bounds, pos = {0}, 0
    while pos < rows * seq:
        pos += max(1, int(rng.expovariate(1.0 / mean_doc)))
        bounds.add(min(pos, rows * seq))
    bounds |= {r * seq for r in range(rows + 1)}
    return sorted(b for b in bounds if b <= rows * seq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--mean-doc", type=float, default=4000.0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from torch.nn.attention.varlen import varlen_attn

    dev, dt = torch.device("cuda"), torch.bfloat16
    n = args.rows * args.seq
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(n, args.heads, args.dim, device=dev, dtype=dt, generator=g).requires_grad_()
    k, v = (torch.randn(n, args.kv_heads, args.dim, device=dev, dtype=dt, generator=g).requires_grad_()
            for _ in range(2))
    bounds = packed_bounds(args.rows, args.seq, args.mean_doc, 0)
    cu = torch.tensor(bounds, device=dev, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    single_doc_rows = sum(1 for r in range(args.rows)
                          if not any(r * args.seq < b < (r + 1) * args.seq for b in bounds))
    grad = torch.randn_like(q)
    group = args.heads // args.kv_heads

    params = set(inspect.signature(varlen_attn).parameters)  # its keywords moved between torch releases

    def varlen():
        kw = {"enable_gqa": True} if "enable_gqa" in params else {}
        kw.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
        kk, vv = (k, v) if "enable_gqa" in params else (x.repeat_interleave(group, dim=1) for x in (k, v))
        out = varlen_attn(q, kk, vv, cu, cu, longest, longest, **kw)
        torch.autograd.grad(out, (q, k, v), grad)

    def dense(backends=None):
        def step():
            def run():
                qh, kh, vh = (x.view(args.rows, args.seq, -1, args.dim).transpose(1, 2) for x in (q, k, v))
                out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
                torch.autograd.grad(out.transpose(1, 2).reshape(n, args.heads, args.dim), (q, k, v), grad)
            if backends is None:
                run()
            else:
                with sdpa_kernel(backends):
                    run()
        return step

    scale = args.dim ** -0.5

    def cudnn_varlen(expand: bool, through_autograd: bool):
        """torch's cuDNN attention on packed documents (aten._cudnn_attention_forward with cumulative lengths, the
        op nested tensors use). ``expand`` repeats K/V per query head; ``through_autograd`` differentiates the op
        itself, else the backward op is called explicitly."""
        def fwd(qq, kk, vv):
            return torch.ops.aten._cudnn_attention_forward(qq, kk, vv, None, cu, cu, longest, longest, True, 0.0, True,
                                                           False, scale=scale)

        class Explicit(torch.autograd.Function):
            @staticmethod
            def forward(ctx, qq, kk, vv):
                r = fwd(qq, kk, vv)
                ctx.save_for_backward(qq, kk, vv, r[0], r[1], r[6], r[7])
                return r[0]

            @staticmethod
            def backward(ctx, go):
                qq, kk, vv, o, lse, seed, off = ctx.saved_tensors
                return torch.ops.aten._cudnn_attention_backward(
                    go.contiguous(), qq, kk, vv, o, lse, seed, off, torch.empty(0, device=qq.device), cu, cu, longest,
                    longest, 0.0, True, scale=scale)

        def run():
            kk, vv = (x.repeat_interleave(group, dim=1) for x in (k, v)) if expand else (k, v)
            out = fwd(q, kk, vv)[0] if through_autograd else Explicit.apply(q, kk, vv)
            return out, torch.autograd.grad(out, (q, k, v), grad)
        return run

    # correctness of each cuDNN variant against the varlen FlashAttention call the model makes today
    kw_ref = {"enable_gqa": True} if "enable_gqa" in params else {}
    kw_ref.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    kr, vr = (k, v) if "enable_gqa" in params else (x.repeat_interleave(group, dim=1) for x in (k, v))
    ref_out = varlen_attn(q, kr, vr, cu, cu, longest, longest, **kw_ref)
    ref = (ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad))
    errors, candidates = {}, []
    for expand in (False, True):
        for auto in (True, False):
            name = f"varlen cuDNN ({'K/V expanded' if expand else 'GQA'}, {'op autograd' if auto else 'explicit bwd'})"
            try:
                got = cudnn_varlen(expand, auto)()
                got = (got[0], *got[1])
                errors[name] = [round((a.float() - b.float()).abs().max().item(), 5) for a, b in zip(got, ref)]
                candidates.append((name, lambda f=cudnn_varlen(expand, auto): f()))
            except Exception as e:  # noqa: BLE001 - a variant this torch/cuDNN does not take
                errors[name] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"{name}: max |diff| out, dq, dk, dv vs varlen flash: {errors[name]}", flush=True)

    rows = {}
    for name, step in [("varlen flash (model today)", varlen), *candidates, ("dense causal, default dispatch", dense()),
                       ("dense causal, cuDNN", dense([SDPBackend.CUDNN_ATTENTION])),
                       ("dense causal, FlashAttention-2", dense([SDPBackend.FLASH_ATTENTION]))]:
        try:
            rows[name] = round(median_ms(step, args.reps), 3)
        except RuntimeError as e:  # a backend that does not take this shape
            rows[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
        print(f"{name}: {rows[name]}", flush=True)
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows, "seq": args.seq,
              "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim, "documents": len(bounds) - 1,
              "rows_holding_one_document": single_doc_rows, "timing_ms_fwd_bwd": rows,
              "cudnn_max_abs_diff_vs_flash_out_dq_dk_dv": errors,
              "cudnn_version": torch.backends.cudnn.version()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
