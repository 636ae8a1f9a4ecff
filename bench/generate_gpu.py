"""`model.generate` as a user calls it: the hybrid through its CUDA-graph decoding loop (the default on CUDA)
and through transformers' own loop (``cuda_graphs=False``), beside transformers' Llama of the same shape.

    python bench/generate_gpu.py --hybrid /tmp/w/hybrid --dense /tmp/w/dense-llama --out generate.json

Per model, path and prompt length: one untimed call (kernel compilation, self-tests, CUDA graph capture and
cuDNN plans of these lengths), then the wall time of a greedy ``generate`` of 1 token (the prefill and the
first token) and of 1 + N tokens; decoding costs (t(1 + N) - t(1)) / N a token. Each row is written to the
JSON as it lands. Batch 1, bf16, the prompt synthetic ids.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from salatrain.eval.bench_measure import load_bench_model, synthetic_ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids, new: int, **kw) -> float:
    sync(ids.device)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
    sync(ids.device)
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t


def measure(model, length: int, tokens: int, **kw) -> dict:
    ids = synthetic_ids(model.config.vocab_size, 1, length, 0, model.device)
    timed_generate(model, ids, tokens + 1, **kw)  # untimed
    first = timed_generate(model, ids, 1, **kw)
    whole = timed_generate(model, ids, tokens + 1, **kw)
    per = (whole - first) / tokens
    return {"length": length, "tokens": tokens, "first_token_s": first, "ms_per_token": 1e3 * per,
            "tokens_per_s": 1 / per}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hybrid", required=True)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")  # cpu: a rehearsal on small models (no graphs there)
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows: list[dict] = []
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    info = {"device": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "batch": 1}

    def land(row: dict) -> None:
        rows.append(row)
        print(f"{row['model']} ({row['path']}) {row['length']}: {row['ms_per_token']:.2f} ms/token, "
              f"{row['tokens_per_s']:.1f} tok/s, first token {row['first_token_s']:.2f} s", flush=True)
        with open(a.out, "w") as fh:
            json.dump({"settings": vars(a), "device": info, "rows": rows}, fh, indent=1)

    hybrid = load_bench_model("hybrid", a.hybrid, dev, dtype)
    for path, kw in (("generate, CUDA graphs (default)", {}), ("generate, transformers' loop", {"cuda_graphs": False})):
        for n in a.lengths:
            land({"model": "hybrid", "path": path, **measure(hybrid, n, a.tokens, **kw)})
    del hybrid
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    dense = load_bench_model("transformers", a.dense, dev, dtype)
    for n in a.lengths:
        land({"model": "dense (transformers)", "path": "generate, default dispatch", **measure(dense, n, a.tokens)})


if __name__ == "__main__":
    main()
