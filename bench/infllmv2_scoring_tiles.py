"""InfLLM-V2's block-scoring kernel alone, at other tile shapes and launch settings than the default (GPU).

    python bench/infllmv2_scoring_tiles.py [--T 32768 131072] [--out FILE]

The scoring kernel (score.py) takes tiles of BQ queries x the group's heads as the rows of its matmuls and walks the
compressed keys BC columns a step, twice (log-sum-exp, then probabilities max-pooled into blocks). For each setting
(query rows a tile, columns a step, num_warps / num_stages; "tuned" = the autotuned default), times the scoring of
every sparse row at SALA's settings (32 query / 2 KV heads, d128, bf16, random q/k; triton.testing.do_bench median)
and its rate in TFLOP/s counting both passes' q·k products over the visible windows. Each setting's block lists
must equal the default's (the selection a user gets); a setting whose lists differ is reported, not timed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_infllmv2 as B  # noqa: E402  (also makes salatrain_kernels importable)

from salatrain_kernels.infllm_v2 import interface, score  # noqa: E402
from salatrain_kernels.infllm_v2.layout import DocLayout  # noqa: E402
from salatrain_kernels.infllm_v2.params import SparseParams  # noqa: E402

# (label, query rows a tile (rows_per_tile x group), columns a step, (num_warps, num_stages) or None: tuned)
SETTINGS = [
    ("default", None, None, None),
    ("64 rows", 64, None, None),
    ("128 columns", None, 128, None),
    ("64 rows, 128 columns", 64, 128, None),
    ("8 warps, 2 stages", None, None, (8, 2)),
    ("8 warps, 3 stages", None, None, (8, 3)),
    ("4 warps, 2 stages", None, None, (4, 2)),
    ("4 warps, 3 stages", None, None, (4, 3)),
    ("64 rows, 4 warps, 3 stages", 64, None, (4, 3)),
]


def patched(rows: int | None, cols: int | None, launch: tuple[int, int] | None):
    """Patch BlockScorer's tile shape and the scoring kernel's launch; returns the function that undoes it."""
    init, launch_fn = score.BlockScorer.__init__, score._block_scores.launch

    def new_init(self, *a, **kw):
        init(self, *a, **kw)
        if cols:
            self.cols_per_step = cols
            self.blocks_per_tile = max(1, cols // self.ratio)
        if rows:
            self.rows_per_tile = max(1, rows // self.group_pad)

    def new_launch(grid, tune, **kw):
        return launch_fn(grid, False, default=launch, **kw) if launch else launch_fn(grid, tune, **kw)

    score.BlockScorer.__init__, score._block_scores.launch = new_init, new_launch

    def undo():
        score.BlockScorer.__init__, score._block_scores.launch = init, launch_fn

    return undo


def measure(T: int) -> list[str]:
    import triton

    q, k, _, _ = B.make_inputs(T, torch.bfloat16, "cuda", "random")
    params = SparseParams(**B.SALA)
    dense = B.SALA["dense_len"]
    qs = q[:, dense:]
    layout = DocLayout.build(qs, k, None)
    q3, k3 = qs.reshape(-1, B.HQ, B.D), k.reshape(-1, B.HKV, B.D)
    scale = B.D**-0.5
    # q.k products of both passes: each sparse query row x head over the windows ending at or before it
    windows = sum(max(0, (t + 1 - params.kernel_size) // params.kernel_stride + 1) for t in range(dense, T))
    flop = 2 * 2 * B.HQ * B.D * windows
    reference = None
    lines = []
    for label, rows, cols, launch in SETTINGS:
        undo = patched(rows, cols, launch)
        try:
            lists = interface.select_blocks(q3, k3, layout, params, scale)
            if reference is None:
                reference = lists
            elif not torch.equal(lists, reference):
                n = (lists != reference).any(-1).sum().item()
                lines.append(f"| {T // 1024}K | {label} | lists differ from the default's in {n} rows | | |")
                continue

            def scoring():
                for _ in interface.score_chunks(q3, k3, layout, params, scale):
                    pass

            scoring()
            ms = triton.testing.do_bench(scoring, warmup=25, rep=200)
        except Exception as e:  # a setting that does not compile or fit (shared memory, registers) is a row
            lines.append(f"| {T // 1024}K | {label} | {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |")
            continue
        finally:
            undo()
        print(f"[scoring] T={T} {label}: {ms:.2f} ms", flush=True)
        lines.append(f"| {T // 1024}K | {label} | {ms:.2f} | {flop / ms / 1e9:.0f} | |")
    return lines


def main() -> None:
    B.run_lengths(__doc__, "InfLLM-V2 block scoring, tile shapes and launch settings", measure,
                  ("| T | setting | ms | TFLOP/s | note |", "|---|---|---|---|---|"))


if __name__ == "__main__":
    main()
