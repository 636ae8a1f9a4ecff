"""Whole-model training step, hybrid against transformers' own dense model of the same shape, on one GPU.

    python bench/whole_model_step.py --dense <dense HF dir> --hybrid <hybrid dir> [--lengths 8192 32768] [--steps 6]

Each model trains on random token rows of each length (batch 1, bf16 parameters, AdamW, no activation
checkpointing): forward with labels (each model's own loss), backward, optimizer step. The dense model is loaded
with transformers' `AutoModelForCausalLM` (for a Llama checkpoint: `LlamaForCausalLM` on transformers' default
attention, SDPA, which dispatches to cuDNN on an H200), the hybrid with salatrain's class on its Triton kernels.
Times are CUDA-event medians of the steps after `--warmup` untimed ones (Triton compilation and autotuning are not
timed); peak memory is `torch.cuda.max_memory_allocated` over the timed steps. Prints a table and writes
`--out` (JSON). Both models run in one process, one after the other, on the same GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(path: str, hybrid: bool):
    if hybrid:
        from salatrain.models import SalaHybridForCausalLM

        model = SalaHybridForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return model.to("cuda").train()


def trainer_loss(model, chunk: int = 8192):
    """The loss `salatrain train` computes: its lm stage (hidden states, then lm_head and cross-entropy fused and
    chunked; the targets' positions given as the host-built layout gives them) with the trainer's elementwise
    fusion on."""
    from salatrain.models.modeling_sala_hybrid import set_fused_elementwise
    from salatrain.train.stages import LMStage

    set_fused_elementwise(True)
    stage = LMStage(model, chunk)

    def loss(input_ids, labels):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)[None]
        total, _ = stage(input_ids, pos, target_index=pos[0, :-1], target=labels[0, 1:])
        return total / (T - 1)

    return loss


def own_loss(model):
    return lambda input_ids, labels: model(input_ids=input_ids, labels=labels).loss


def time_steps(model, loss_fn, T: int, vocab: int, steps: int, warmup: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator(device="cuda").manual_seed(T)
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (1, T), device="cuda", generator=gen)
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = loss_fn(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at T={T}")
    del opt
    ms = statistics.median(times)
    return dict(T=T, step_ms=ms, tokens_per_s=T / ms * 1e3, spread_ms=[min(times), max(times)],
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def profile_step(model, loss_fn, T: int, vocab: int, name: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, vocab, (1, T), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss_fn(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    print(f"\n[profile] {name}, T={T}, one step:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    del opt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--hybrid", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="whole_model_step.json")
    p.add_argument("--trainer-step", action="store_true", help="also the hybrid with the loss and elementwise "
                   "fusion `salatrain train` uses (fused chunked lm_head + cross-entropy, torch.compile'd norms/gates)")
    p.add_argument("--profile", action="store_true", help="after the timed steps, one more step of each model at the "
                   "longest length under torch.profiler: the CUDA time per kernel (top 25)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("whole_model_step.py needs a CUDA GPU")
    rows = []
    runs = [("dense (transformers)", args.dense, False, own_loss), ("hybrid (salatrain)", args.hybrid, True, own_loss),
            ("hybrid, salatrain train's step", args.hybrid, True, trainer_loss)]
    for name, path, hybrid, make_loss in runs if args.trainer_step else runs[:2]:
        model = load(path, hybrid)
        loss_fn = make_loss(model)
        vocab = model.config.vocab_size
        params = sum(p.numel() for p in model.parameters())
        for T in args.lengths:
            try:
                row = time_steps(model, loss_fn, T, vocab, args.steps, args.warmup)
            except torch.OutOfMemoryError:
                row = dict(T=T, step_ms=None, tokens_per_s=None, note="out of memory")
            row.update(model=name, params=params, cls=type(model).__name__)
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        if args.profile:
            profile_step(model, loss_fn, max(args.lengths), vocab, name)
        del model
        torch.cuda.empty_cache()
    dense = {r["T"]: r for r in rows if not r["model"].startswith("hybrid")}
    print(f"\n{torch.cuda.get_device_name(0)}; torch {torch.__version__}\n")
    print("| model | class | T | step ms (min-max) | tokens/s | peak GiB | hybrid / dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = dense.get(r["T"], {}).get("tokens_per_s")
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if r.get("tokens_per_s") and base and r["model"].startswith(
            "hybrid") else ""
        if r.get("step_ms") is None:
            print(f"| {r['model']} | {r['cls']} | {r['T']} | OOM | | | |")
            continue
        lo, hi = r["spread_ms"]
        print(f"| {r['model']} | {r['cls']} | {r['T']} | {r['step_ms']:.1f} ({lo:.1f}-{hi:.1f}) | "
              f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {ratio} |")
    Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__,
                                              rows=rows), indent=1))


if __name__ == "__main__":
    main()
