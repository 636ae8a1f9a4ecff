"""Kernel benchmarks on one GPU: Lightning attention (bench_lightning) and InfLLM-V2 sparse attention
(bench_infllmv2, when present). Measures the card's ceilings (bf16 matmul, device copy) in the same run,
prints one markdown table and appends it to docs/perf.md under a heading naming the GPU, date, versions
and shapes. Each family runs its correctness gates first and does not time a failing kernel.

    python bench/kernels.py [--quick] [--out docs/perf.md] [--T 8192 32768]

--quick: T = 8K and 32K and shorter timing loops. Needs CUDA; fla (flash-linear-attention) is optional.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import inspect
import pathlib
import sys
import time
import traceback

import torch

HERE = pathlib.Path(__file__).resolve().parent
FAMILIES = ("bench_lightning", "bench_infllmv2")
DEFAULT_T = [8192, 32768, 131072]
QUICK_T = [8192, 32768]


def measure_ceilings():
    """Achievable bf16 matmul TFLOP/s and device-to-device copy GB/s on this card, measured now."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    src = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    cp_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n ** 3 / mm_ms / 1e9, "copy_gbps": 2 * 2 ** 30 / cp_ms / 1e6}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def format_table(rows):
    """Markdown table over the union of the rows' keys (first-seen order)."""
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def heading(ceilings, T_list, quick):
    import triton

    return (f"## {torch.cuda.get_device_name()} — {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
            f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; bf16, batch 1, "
            f"T in {T_list}{' (--quick)' if quick else ''}. Lightning: 32 heads x 128, hidden 4096. "
            f"Measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, "
            f"copy {ceilings['copy_gbps']:.0f} GB/s. Times: do_bench medians in ms; `speedup` = that row's "
            f"fwd+bwd time / ours (triton) at the same T.\n")


def run_family(name, T_list, ceilings, quick):
    if importlib.util.find_spec(name) is None:
        print(f"[{name}] not present, skipped", flush=True)
        return []
    t0 = time.time()
    try:
        mod = importlib.import_module(name)
        params = inspect.signature(mod.run).parameters
        extra = {k: v for k, v in (("ceilings", ceilings), ("quick", quick)) if k in params}
        rows = mod.run(T_list, torch.bfloat16, **extra)
    except Exception:
        traceback.print_exc()
        return [dict(kernel=name, T="-", impl="-", note="benchmark raised; see log")]
    print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Kernel benchmarks (see module docstring).")
    p.add_argument("--quick", action="store_true", help="T = 8K, 32K and shorter timing loops")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "perf.md"), help="markdown file to append to")
    p.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 8K 32K 128K)")
    p.add_argument("--only", choices=FAMILIES, nargs="+", help="run only these families (default: all)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    sys.path.insert(0, str(HERE))
    T_list = args.T or (QUICK_T if args.quick else DEFAULT_T)
    t0 = time.time()
    ceilings = measure_ceilings()
    print(f"[ceilings] {ceilings}", flush=True)
    rows = []
    for name in args.only or FAMILIES:
        rows += run_family(name, T_list, ceilings, args.quick)
    text = heading(ceilings, T_list, args.quick) + "\n" + format_table(rows) + "\n"
    print("\n" + text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write("\n" + text)
    print(f"appended to {out}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
