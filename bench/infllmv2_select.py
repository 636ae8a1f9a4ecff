"""InfLLM-V2's scoring + top-K selection: one fused kernel against scoring then a selection kernel (GPU).

    python bench/infllmv2_select.py [--T 32768 131072] [--heads 32,2,128 9,3,64] [--data random "correlated w16"]
                                    [--out FILE]

For each length, head shape and kind of q/k (bench_infllmv2.make_inputs: i.i.d. random, or correlated along T as
a converted model's q/k are), times `select_blocks` (the block lists of every sparse row, SALA's sparse settings)
with FUSED_SELECT on and off (triton.testing.do_bench medians), the scoring kernel alone (its fp32 score buffers
written, no selection), and the peak memory above the inputs of each. The two paths' lists are compared first and
must be equal. Prints markdown; --out appends it to a file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infllmv2 as B  # noqa: E402  (also makes salatrain_kernels importable)

from salatrain_kernels.infllm_v2 import interface  # noqa: E402
from salatrain_kernels.infllm_v2.layout import DocLayout  # noqa: E402
from salatrain_kernels.infllm_v2.params import SparseParams  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(median ms, peak GiB allocated above what was allocated before), after one warm-up call."""
    import triton

    fn()
    peak = B.peak_gib(fn)
    return triton.testing.do_bench(fn, warmup=25, rep=200), peak


def measure(T: int, heads: tuple[int, int, int], data: str) -> str:
    hq, hkv, d = heads
    B.HQ, B.HKV, B.D = hq, hkv, d  # make_inputs draws these shapes
    q, k, _, _ = B.make_inputs(T, torch.bfloat16, "cuda", data)
    params = SparseParams(**B.SALA)
    qs = q[:, B.SALA["dense_len"]:]
    layout = DocLayout.build(qs, k, None)
    q3, k3 = qs.reshape(-1, hq, d), k.reshape(-1, hkv, d)
    scale = d**-0.5

    def lists(fused: bool):
        interface.FUSED_SELECT = fused
        return interface.select_blocks(q3, k3, layout, params, scale)

    def scoring():
        for _ in interface.score_chunks(q3, k3, layout, params, scale):
            pass

    default = interface.FUSED_SELECT
    try:
        plain, fused = lists(False), lists(True)
        if not torch.equal(plain, fused):
            rows = (plain != fused).any(-1).sum().item()
            return f"| {T // 1024}K | {hq},{hkv},{d} | {data} | lists differ in {rows} rows | | | |"
        s_ms, s_gb = timed(scoring)
        p_ms, p_gb = timed(lambda: lists(False))
        f_ms, f_gb = timed(lambda: lists(True))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return f"| {T // 1024}K | {hq},{hkv},{d} | {data} | out of memory | | | |"
    finally:
        interface.FUSED_SELECT = default
    print(f"[select] T={T} heads={hq},{hkv},{d} {data}: scoring {s_ms:.2f}, +selection {p_ms:.2f}, fused {f_ms:.2f} ms",
          flush=True)
    return (f"| {T // 1024}K | {hq},{hkv},{d} | {data} | {s_ms:.2f} ({s_gb:.2f}) | {p_ms:.2f} ({p_gb:.2f}) | "
            f"{f_ms:.2f} ({f_gb:.2f}) | {p_ms / f_ms:.2f}× |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", nargs="+", default=[f"{B.HQ},{B.HKV},{B.D}", "9,3,64"], metavar="HQ,HKV,D")
    ap.add_argument("--data", nargs="+", default=["random", "correlated w16"])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    shapes = [B.parse_heads(h) for h in a.heads]
    lines = [f"## InfLLM-V2 scoring + selection, fused and not — {torch.cuda.get_device_name()}", "",
             f"bf16, batch 1, SALA's sparse settings {B.SALA}; ms (peak GiB above the inputs)", "",
             "| T | heads HQ,HKV,D | q/k | scoring alone | scoring, then selection kernel | fused | speedup |",
             "|---|---|---|---|---|---|---|"]
    for T in a.T:
        for heads in shapes:
            for data in a.data:
                lines.append(measure(T, heads, data))
                torch.cuda.empty_cache()
    B.emit(lines, a.out)


if __name__ == "__main__":
    main()
