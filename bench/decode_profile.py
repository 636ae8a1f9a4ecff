"""Where a decoded token's time goes on a GPU: host time by part of the model (module hooks, no synchronisation
inside a step: what the host spends dispatching), then torch.profiler's tables of one run of decoding steps
(host time per op, CUDA time per kernel) and the GPU's busy time per token against the step's wall time.

    python bench/decode_profile.py --model <hybrid or dense dir> --lengths 8192 131072 --out profile.md

Loads the model as `salatrain bench` does (bench_measure.load_bench_model), prefills a synthetic prompt, decodes
`--warmup` untimed tokens, then `--tokens` tokens under each measurement.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from salatrain.eval.bench_measure import cache_arg, decode, load_bench_model, prefill, synthetic_ids


def part_of(module) -> str | None:
    name = type(module).__name__
    if name in ("SparseAttention", "LightningAttention", "FullAttention", "LlamaAttention", "SalaRMSNorm",
                "LlamaRMSNorm", "LlamaMLP", "SalaMLP"):
        return name
    return None


def host_time_by_part(model, cache, token, arg, tokens: int) -> tuple[dict, float]:
    """Host wall time of each part's forward (outermost part only), summed over `tokens` steps, in ms per token."""
    spent, stack = collections.Counter(), []

    def pre(mod, _args):
        stack.append((part_of(mod), time.perf_counter()))

    def post(mod, _args, _out):
        part, t0 = stack.pop()
        if not any(p for p, _ in stack):  # outermost part only (a mixer's own norms count in the mixer)
            spent[part] += time.perf_counter() - t0

    hooks = []
    for m in model.modules():
        if part_of(m):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        decode(model, cache, token, tokens, arg)
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    parts = {k: 1e3 * v / tokens for k, v in spent.most_common()}
    parts["(rest: embeddings, head, sampling, cache)"] = 1e3 * host / tokens - sum(parts.values())
    return parts, 1e3 * wall / tokens


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kind", default="hybrid", help="hybrid (salatrain's class) or transformers")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    device = torch.device("cuda")
    model = load_bench_model(a.kind, a.model, device, torch.bfloat16)
    arg = cache_arg(model)
    lines = [f"# Decoding profile: {a.model} ({a.kind}) on {torch.cuda.get_device_name(device)}", ""]
    for n in a.lengths:
        ids = synthetic_ids(model.config.vocab_size, 1, n, 0, device)
        cache, token = prefill(model, ids, None, arg)
        cache, token = decode(model, cache, token, a.warmup, arg)
        parts, wall = host_time_by_part(model, cache, token, arg, a.tokens)
        lines += [f"## prompt {n}: {wall:.2f} ms a token (wall, synchronised at the end)", "",
                  "| part | host ms a token |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in parts.items()]
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            decode(model, cache, token, a.tokens, arg)
            torch.cuda.synchronize()
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e3 / a.tokens
        lines += ["", f"GPU kernel time {busy:.2f} ms a token (sum of kernels; under the profiler)", "", "```",
                  events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60), "```", "", "```",
                  events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60), "```", ""]
        print("\n".join(lines[-60:]), flush=True)
        del cache, token
    with open(a.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
