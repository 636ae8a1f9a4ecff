"""Cached decoding of a hybrid on one GPU: tokens/s and host synchronisations per token, with the sparse layers on
the Triton op (`decode_with_step = False`) and on the one-token step infllmv2_decode_torch (the default,
`decode_with_step`; the prefill runs the kernels either way), at a few prompt lengths; a transformers dense model
beside it (torch's default SDPA dispatch, and SDPA kept off cuDNN).

    python bench/decode_gpu.py --hybrid <dir> --dense <dir> --lengths 8192 131072 --out decode.json

Each length: one prefill builds the cache, `--warmup` untimed steps, then `--tokens` greedy steps timed with CUDA
events (median of `--repeats`). Synchronisations: torch's sync debug mode counts the host reads of one step; torch
ops: the aten ops one step dispatches (a decoded token's time on a GPU is mostly the host launching them).
On CUDA a third path decodes through GraphDecoder (salatrain.models.decode_graphs: the step, with the layers
between attention calls replayed as CUDA graphs; its warm-up and capture steps come before the untimed ones).
`--device cpu` rehearses the script on tiny models (wall clock, no synchronisation count; both sparse paths are the
step there, the kernels running on CUDA only); tests/test_bench_command.py runs it so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from salatrain.eval.bench_device import Clock, PeakMemory
from salatrain.eval.bench_measure import cache_arg, decode, load_bench_model, prefill, synthetic_ids
from salatrain.models.decode_graphs import GraphDecoder


def syncs_per_step(model, cache, token, arg: str, step=decode) -> int | None:
    if not torch.cuda.is_available() or model.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(model, cache, token, 1, arg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops a region dispatches (views included; Triton launches do not pass through here)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model, cache, token, arg: str, step=decode) -> int:
    """The torch ops one decoding step dispatches: on a GPU each non-view op is a kernel launch the host pays (a
    CUDA graph's replay dispatches none of the ops it holds)."""
    with _CountOps() as count:
        step(model, cache, token, 1, arg)
    return count.ops


class _Graphed:
    """decode() through GraphDecoder (the cache argument carries the decoder)."""

    def __init__(self, model):
        self.model = model

    def prefill(self, ids, arg):
        cache, token = prefill(self.model, ids, None, arg)
        dec = GraphDecoder(self.model, cache, token)
        for _ in range(dec.setup_steps):  # eager warm-up steps, then the capture
            token = dec.step()
        return dec, token

    @staticmethod
    @torch.no_grad()
    def decode(_model, dec, token, steps, _arg):
        for _ in range(steps):
            token = dec.step()
        return dec, token


def time_decode(model, length: int, tokens: int, warmup: int, repeats: int, graphs: bool = False) -> dict:
    arg = cache_arg(model)
    ids = synthetic_ids(model.config.vocab_size, 1, length, 0, model.device)
    clock = Clock(model.device)
    runs, syncs, ops = [], None, None
    graphed = _Graphed(model) if graphs else None
    step = graphed.decode if graphs else decode
    for _ in range(repeats):
        cache, token = graphed.prefill(ids, arg) if graphs else prefill(model, ids, None, arg)
        greedy = [int(token)]
        for _ in range(warmup):  # untimed; the greedy tokens show the sparse paths decode alike
            cache, token = step(model, cache, token, 1, arg)
            greedy.append(int(token))
        if syncs is None:
            syncs = syncs_per_step(model, cache, token, arg, step)
            ops = ops_per_step(model, cache, token, arg, step)
        clock.start()
        step(model, cache, token, tokens, arg)
        runs.append(clock.stop())
        del cache, token
    t = statistics.median(runs)
    return {"length": length, "tokens": tokens, "s": t, "ms_per_token": 1e3 * t / tokens, "tokens_per_s": tokens / t,
            "syncs_per_token": syncs, "torch_ops_per_token": ops, "greedy": greedy}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hybrid", required=True)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    hybrid = load_bench_model("hybrid", a.hybrid, device, dtype)
    sparse = [m for m in hybrid.modules() if type(m).__name__ == "SparseAttention"]
    paths = ("triton op", "step", "step + CUDA graphs") if device.type == "cuda" else ("triton op", "step")
    for path in paths:
        for m in sparse:  # prefill runs the kernels either way (the reference's prefill is quadratic)
            m.decode_with_step = path != "triton op"
        for n in a.lengths:
            t0 = time.time()
            peak = PeakMemory(device)
            peak.reset()
            r = time_decode(hybrid, n, a.tokens, a.warmup, a.repeats, graphs="graphs" in path)
            rows.append({"model": "hybrid", "sparse decode": path, **r,
                         "peak_gib": peak.read() / 2**30})
            print(f"hybrid ({path}) {n}: {r['ms_per_token']:.2f} ms/token, {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['syncs_per_token']} syncs/token, {r['torch_ops_per_token']} torch ops/token, "
                  f"greedy {r['greedy']} ({time.time() - t0:.0f} s)", flush=True)
    del hybrid
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dense = load_bench_model("transformers", a.dense, device, dtype)
    # torch's default dispatch (what a user gets; cuDNN attention on an H200, which plans each new key length),
    # and the same model with SDPA kept off cuDNN, as the hybrid's decoding step does
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    variants = [("default dispatch", contextlib.nullcontext)]
    if device.type == "cuda":
        variants.append(("no cuDNN", lambda: sdpa_kernel(no_cudnn)))
    for sdpa, ctx in variants:
        for n in a.lengths:
            with ctx():
                r = time_decode(dense, n, a.tokens, a.warmup, a.repeats)
            rows.append({"model": "dense (transformers)", "sdpa": sdpa, **r})
            print(f"dense ({sdpa}) {n}: {r['ms_per_token']:.2f} ms/token, {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['syncs_per_token']} syncs/token, {r['torch_ops_per_token']} torch ops/token", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = {"device": name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "batch": 1}
    with open(a.out, "w") as fh:
        json.dump({"settings": vars(a), "device": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
