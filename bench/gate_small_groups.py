"""The bench's correctness gate (bench_infllmv2.gate: full op at T = 2048 against the fp32 reference, within twice
the error of the same computation in bf16 PyTorch) for a small group, packed and per-query, over several seeds:
whether a gate result is the kernel's or the rule's spread.

    python bench/gate_small_groups.py [--heads 3,1,64] [--seeds 4]
"""
import argparse

import torch

import bench_infllmv2 as B


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default="3,1,64", metavar="HQ,HKV,D")
    ap.add_argument("--seeds", type=int, default=4)
    a = ap.parse_args()
    hq, hkv, B.D = B.parse_heads(a.heads)
    for seed in range(a.seeds):
        for on in (False, True):
            torch.manual_seed(seed)
            B.GATE_T = 2048 + 64 * seed  # another draw of the gate's inputs per seed
            ok, note = B._packed(lambda: B.gate("cuda", torch.bfloat16, "exact", heads=(hq, hkv)), on=on)
            print(f"seed {seed} {'packed   ' if on else 'per-query'}: {'PASS' if ok else 'FAIL'} {note}", flush=True)


if __name__ == "__main__":
    main()
