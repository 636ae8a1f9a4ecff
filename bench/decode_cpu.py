"""Host cost of cached decoding on the CPU, per mixer: ms per generated token of a 16-layer model with tiny
widths (hidden 64, 32 query / 2 K/V heads of 16, so the work is attention over the cache and per-op overhead),
after a prompt of T tokens. All full attention, all InfLLM-V2 (dense_len 1024: the sparse path runs), and the
SALA mix (1 sparse : 3 Lightning).

    python bench/decode_cpu.py [--T 8192 16384] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from salatrain.eval.bench_measure import cache_arg, decode, prefill
from salatrain.models import SalaHybridConfig, SalaHybridForCausalLM

SPARSE = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=16, window_size=512, dense_len=1024)
MIXES = {
    "full_attention x16": ["full_attention"] * 16,
    "sparse_attention x16": ["sparse_attention"] * 16,
    "hybrid 4 sparse + 12 lightning": ["sparse_attention" if i % 4 == 0 else "linear_attention" for i in range(16)],
}


def ms_per_token(mixers: list[str], T: int, tokens: int = 20) -> float:
    cfg = SalaHybridConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=len(mixers),
                           num_attention_heads=32, num_key_value_heads=2, head_dim=16, mixer_types=mixers,
                           sparse_config=SPARSE)
    torch.manual_seed(0)
    model = SalaHybridForCausalLM(cfg).eval()
    arg = cache_arg(model)
    cache, token = prefill(model, torch.randint(0, 512, (1, T)), None, arg)
    cache, token = decode(model, cache, token, 3, arg)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        cache, token = decode(model, cache, token, tokens, arg)
        best = min(best, (time.perf_counter() - t0) / tokens)
    return best * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| mixers | T | ms / token |\n|---|---|---|")
    for name, mixers in MIXES.items():
        for T in args.T:
            print(f"| {name} | {T} | {ms_per_token(mixers, T):.1f} |", flush=True)


if __name__ == "__main__":
    main()
