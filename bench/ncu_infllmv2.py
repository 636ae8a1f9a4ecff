"""One InfLLM-V2 forward+backward at SALA's settings for Nsight Compute: warm-up (compilation, autotuning) outside
the profiled range, then one call inside torch.cuda.profiler.start()/stop().

    ncu --profile-from-start off --kernel-name regex:"gather|local_|block_scores|select" \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --csv --page details \\
        python bench/ncu_infllmv2.py --T 32768 [--data "correlated w16"] [--share 4]

Shapes as bench/bench_infllmv2.py (bf16, batch 1, 32 query / 2 KV heads, head dim 128).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infllmv2 import SALA, make_inputs  # noqa: E402

from salatrain_kernels.infllm_v2 import infllmv2_attn  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--data", default="random")
    p.add_argument("--share", type=int, default=1)
    args = p.parse_args(argv)
    q, k, v, do = make_inputs(args.T, torch.bfloat16, "cuda", args.data)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        out = infllmv2_attn(q, k, v, backend="triton", share_tokens=args.share, **SALA)
        torch.autograd.grad(out, (q, k, v), do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
