"""Training throughput of the hybrid vs the same-size dense model through the same DeepSpeed engine (GPU).

Run by bench/train_gpu.sh; its phases:

    python bench/train_bench.py build  --work W [--size small]  random 0.83B dense Llama (hidden 2048, 16 layers,
                                                                 32 query / 2 KV heads, head dim 64), its 0.99B
                                                                 hybrid (4 sparse + 12 Lightning layers), a
                                                                 long-document corpus, the bf16 matmul peak
    torchrun --nproc_per_node 2 bench/train_bench.py run --work W --gpus 2 --deadline T
    python bench/train_bench.py run --work W --gpus 1 --deadline T
    python bench/train_bench.py report --work W --out FILE      markdown table (stdout and FILE)

The last rows are long context: the hybrid at 128K tokens per row split over 2 GPUs (trainer.sequence_parallel=2)
and at 64K on one GPU (the same tokens per GPU; the report gives their per-GPU throughput ratio). Only those:

    ONLY=hybrid-lm-zero2-xlong-2gpu-sp2,hybrid-lm-zero2-xlong_half-1gpu BUDGET_S=900 bash bench/train_gpu.sh

``run`` goes through its configurations in priority order, each a few optimizer steps of `salatrain train`
in this process, and appends one JSON line per configuration to W/results.jsonl (OOM and errors recorded,
then the next one runs; configurations past the deadline are recorded as skipped). On more than one GPU an
error ends the process after it is recorded (the other ranks may wait in a collective it will never join);
bench/train_gpu.sh then starts the next attempt after it. A configuration that was started but never finished
(the process died or hung) is recorded as crashed on the next ``run``. ``build`` (each invocation of
bench/train_gpu.sh) forgets every row but ok and OOM, so a new invocation retries failures and skips.

Throughput is the median tokens/s over the steps after the first two (compilation and warm-up); MFU is
model FLOPs (salatrain.train.flops) per second over the measured matmul peak of each GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    # the GPU proof: 0.83B dense / 0.99B hybrid parameters, 16 query heads per KV head (InfLLM-V2's kernel needs >= 16)
    "full": dict(model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
                            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
                 # the 8B-class SALA shape of the scaling suite (MiniCPM4-8B's: 32 layers, hidden 4096, 32 query / 2 KV
                 # heads of 128, MLP 16384, vocab 73448; 8.2B parameters)
                 model_8b=dict(vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                               max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                               tie_word_embeddings=False),
                 short=4096, long=32768, xlong=131072, xlong_half=65536, x256k=262144, x512k=524288, x1m=1048576,
                 device="cuda"),
    # a CPU rehearsal of the whole script (orchestration only; numbers meaningless)
    "small": dict(model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                             rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
                  model_8b=dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                                rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
                  short=128, long=512, xlong=1024, xlong_half=512, x256k=1536, x512k=2048, x1m=4096, device="cpu"),
}

# (model, stage, zero, sequence, gpus[, sequence_parallel]) in priority order: what the GPU proof needs first.
# Sequences: "short", "long", and "xlong" split over the GPUs (sequence parallel) vs "xlong_half" on one GPU.
CONFIGS = [
    ("dense", "lm", 2, "short", 2), ("hybrid", "lm", 2, "short", 2),
    ("dense", "lm", 2, "long", 2), ("hybrid", "lm", 2, "long", 2),
    ("hybrid", "distill", 2, "short", 2), ("hybrid", "distill", 3, "short", 2),
    ("dense", "lm", 3, "short", 2), ("hybrid", "lm", 3, "short", 2),
    ("dense", "lm", 2, "short", 1), ("hybrid", "lm", 2, "short", 1),
    ("dense", "distill", 2, "short", 2),
    ("dense", "lm", 3, "long", 2), ("hybrid", "lm", 3, "long", 2),
    ("hybrid", "distill", 2, "long", 2), ("hybrid", "distill", 3, "long", 2),
    ("dense", "lm", 2, "long", 1), ("hybrid", "lm", 2, "long", 1),
    ("hybrid", "lm", 2, "xlong", 2, 2), ("hybrid", "lm", 2, "xlong_half", 1),
]
# The scaling suite (bench/scale_gpu.sh, SUITE=scale): 1 -> 2 -> 4 -> 8 GPUs, ZeRO-2 and ZeRO-3, 4K and 32K, the
# ~1B hybrid beside the same-shape dense model; the hybrid at 512K rows split over 8 GPUs; the 8B-class shape at 32K
# with ZeRO-3 on 8. Priority order: the scaling endpoints first, so a short lease still gives efficiencies.
SCALE_CONFIGS = [
    *[(m, "lm", 2, "short", g) for g in (1, 8, 2, 4) for m in ("dense", "hybrid")],
    *[(m, "lm", 3, "short", g) for g in (1, 8) for m in ("dense", "hybrid")],
    *[(m, "lm", 2, "long", g) for g in (1, 8) for m in ("dense", "hybrid")],
    ("hybrid", "lm", 2, "x512k", 8, 8),
    ("dense8b", "lm", 3, "long", 8), ("hybrid8b", "lm", 3, "long", 8),
    *[(m, "lm", 3, "short", g) for g in (2, 4) for m in ("dense", "hybrid")],
    *[(m, "lm", z, "long", g) for z, g in ((2, 2), (2, 4), (3, 1), (3, 8)) for m in ("dense", "hybrid")],
]
# The longest row that trains (SUITE=longest): the ~1B hybrid, lm, ZeRO-2, activation checkpointing, at doubling
# lengths on 1 GPU and split over 2 (SP=2); an out-of-memory length is a row, and the report names the longest
# that trained on each.
LONGEST_CONFIGS = [
    *[("hybrid", "lm", 2, which, 2, 2) for which in ("xlong", "x256k", "x512k", "x1m")],
    *[("hybrid", "lm", 2, which, 1) for which in ("xlong_half", "xlong", "x256k", "x512k")],
]
SUITES = {"proof": CONFIGS, "scale": SCALE_CONFIGS, "longest": LONGEST_CONFIGS}
COST_S = {"short": 30, "long": 50, "xlong": 60, "xlong_half": 60, "x256k": 60, "x512k": 110,
          "x1m": 200}  # rough wall time of one config (long rows: 1-GPU walls of 53 / 23 / 35 s at 64K / 128K / 256K
                       # on an H200, 2026-12-01, the first including Triton's compilation)

# Knobs (environment, read by every phase):
#   ACCUM=N       micro-steps per optimizer step (default 1): the optimizer step and its gradient reduction are
#                 paid once per N micro-batches, as in real runs with large global batches
#   LONG_CKPT=0   no activation checkpointing on the long rows (default 1: checkpointing on)
#   ONLY=k1,k2    run only these configuration keys (e.g. dense-lm-zero2-short-2gpu), in CONFIGS order
#   SUITE=scale   the scaling suite (SCALE_CONFIGS) instead of the training proof (CONFIGS)
#   SUITE=longest the longest row that trains on 1 GPU and on 2 (LONGEST_CONFIGS)
#   STEPS=N       optimizer steps of every configuration (default 8 / 5, or 5 / 4 with ACCUM > 1): the median
#                 of 3-6 steps moves by ±20% between invocations on an H200, too much to tell two codes apart
#   PROFILE=1     profile each configuration (trainer.profile_steps=[3,3]: step 3 timed phase by phase, step 4
#                 traced, kernels summed by kind, NCCL communication among them); at least 6 steps, steps 3-4 left
#                 out of the median; profile.md copied beside results.jsonl as profile-<key>.md (train_gpu.sh
#                 brings them to $OUT)
# This file runs the code of the repository it sits in (ROOT goes first on sys.path): to time another checkout,
# run that checkout's bench/train_gpu.sh.
SUITE = os.environ.get("SUITE", "proof")
STEPS = int(os.environ.get("STEPS", "0"))
ACCUM = int(os.environ.get("ACCUM", "1"))
LONG_CKPT = os.environ.get("LONG_CKPT", "1") != "0"
ONLY = [k for k in os.environ.get("ONLY", "").split(",") if k]
PROFILE = os.environ.get("PROFILE", "0") != "0"
PROFILED_STEPS = (3, 4)  # trainer.profile_steps=[3,3]: step 3 synchronised per phase, step 4 under torch.profiler


def configs() -> list:
    if SUITE not in SUITES:
        sys.exit(f"SUITE={SUITE}: choose one of {', '.join(SUITES)}")
    return SUITES[SUITE]


def sp_of(c) -> int:
    return c[5] if len(c) > 5 else 1


def key(c) -> str:
    model, stage, zero, seq, gpus = c[:5]
    return f"{model}-{stage}-zero{zero}-{seq}-{gpus}gpu" + (f"-sp{sp_of(c)}" if sp_of(c) > 1 else "")


def size_of(work: Path) -> dict:
    return SIZES[json.loads((work / "size.json").read_text())["size"]]


# --------------------------------------------------------------------------------------------------- build


def build(work: Path, size: str, with_8b: bool = False) -> None:
    import torch

    from salatrain.train.flops import measure_peak_tflops
    from salatrain.train.tiny import bpe_tokenizer, doc_topics

    work.mkdir(parents=True, exist_ok=True)
    _forget_unfinished(work / "results.jsonl")
    (work / "size.json").write_text(json.dumps({"size": size}))
    spec, t0 = SIZES[size], time.time()
    device = torch.device(spec["device"])
    texts = [t for _, t in doc_topics()]
    tok = bpe_tokenizer(texts)
    _build_models(work, "", spec["model"], tok, device, t0)
    if with_8b:
        _build_models(work, "8b", spec["model_8b"], tok, device, t0)
    corpus = work / "corpus.jsonl"
    if not corpus.exists():  # long documents: every packed row is one piece of a document (full rows)
        joined = "\n\n".join(texts)
        corpus.write_text("".join(json.dumps({"text": joined}) + "\n" for _ in range(4)))
    peak = work / "peak.json"
    if not peak.exists():
        tflops = max(measure_peak_tflops(device) or 0.0 for _ in range(3))
        name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
        peak.write_text(json.dumps({"tflops": tflops or None, "device": name}))
    mixers = json.loads((work / "hybrid" / "config.json").read_text())["mixer_types"]
    info = json.loads(peak.read_text())
    print(f"[build] hybrid: sparse layers {[i for i, m in enumerate(mixers) if m == 'sparse_attention']}; "
          f"bf16 matmul peak {info['tflops'] or 0:.0f} TFLOP/s on {info['device']} ({time.time() - t0:.0f} s)",
          flush=True)


# --------------------------------------------------------------------------------------------------- run


def overrides(work: Path, c, peak: float | None) -> list[str]:
    model, stage, zero, which, gpus = c[:5]
    seq, sp, long = size_of(work)[which], sp_of(c), which != "short"
    micro, steps = (2, 8) if which == "short" else (1, 5)
    if ACCUM > 1:
        steps = 5 if which == "short" else 4
    steps = STEPS or steps
    if PROFILE:
        steps = max(steps, 6)
    out = [f"model.path={work / model}", f"output_dir={work / 'runs' / key(c)}",
           f"stage={'distill' if stage == 'distill' else 'lm'}",
           f"deepspeed=zero{zero}", f"data.files=[{work / 'corpus.jsonl'}]", f"data.cache_dir={work / 'datasets'}",
           f"trainer.seq_len={seq}", f"trainer.micro_batch_size={micro}",
           f"trainer.global_batch_tokens={seq * micro * gpus // sp * ACCUM}", f"trainer.max_steps={steps}",
           f"trainer.sequence_parallel={sp}",
           f"trainer.activation_checkpointing={'true' if long and LONG_CKPT else 'false'}",
           f"trainer.loss_chunk_tokens={min(seq, 8192)}", "trainer.precision=bf16", "trainer.save_every=0",
           "trainer.save_final=false", "trainer.export=false", "optim.lr=1e-5", "optim.warmup_steps=0",
           "optim.schedule=constant", f"logging.peak_tflops={peak if peak else 'null'}", "resume=never"]
    if PROFILE:
        out.append(f"trainer.profile_steps=[{PROFILED_STEPS[0]},{PROFILED_STEPS[0]}]")
    return out + ([f"teacher.path={work / 'dense'}"] if stage == "distill" else [])


def _record(results: Path, row: dict) -> None:
    with open(results, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _done(results: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return {r["key"]: r for r in rows}


def _build_models(work: Path, suffix: str, model_cfg: dict, tok, device, t0: float) -> None:
    """dense{suffix}-llama (transformers' Llama, random init), dense{suffix} (the same weights in the hybrid class,
    every layer full attention) and hybrid{suffix} (a uniform 25% InfLLM-V2 / 75% Lightning conversion)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from salatrain.config.schema import ConvertConfig, PlanSettings
    from salatrain.convert.convert import convert
    from salatrain.hf_checkpoint import CheckpointDir
    from salatrain.models import SalaHybridForCausalLM
    from salatrain.models.loading import dense_config

    llama = work / f"dense{suffix}-llama"
    if not (llama / "config.json").exists():
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM(LlamaConfig(**model_cfg, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                                 pad_token_id=tok.pad_token_id)).to(torch.bfloat16)
        model.save_pretrained(llama, safe_serialization=True)
        tok.save_pretrained(llama)
        n = sum(p.numel() for p in model.parameters())
        del model
        print(f"[build] dense Llama {n / 1e9:.2f}B parameters ({time.time() - t0:.0f} s)", flush=True)
    dense = work / f"dense{suffix}"
    if not (dense / "config.json").exists():  # the same weights as a hybrid checkpoint with every layer full
        cfg = dense_config(CheckpointDir(llama))
        with device:
            model = SalaHybridForCausalLM(cfg).to(torch.bfloat16)
        from safetensors.torch import load_file

        state = {}
        for f in sorted(llama.glob("*.safetensors")):
            state.update(load_file(f))
        model.load_state_dict(state)
        model.save_pretrained(dense, safe_serialization=True)
        tok.save_pretrained(dense)
        del model, state
    hybrid = work / f"hybrid{suffix}"
    if not (hybrid / "config.json").exists():
        convert(ConvertConfig(model=str(llama), output_dir=str(hybrid), plan=PlanSettings(method="uniform", ratio=0.25),
                              kl_check=False))


def _forget_unfinished(results: Path) -> None:
    """A new invocation keeps the measured rows (ok, OOM) of an earlier one in the same work dir and runs again
    what failed, crashed or was skipped for time."""
    if results.exists():
        keep = [line for line in results.read_text().splitlines()
                if json.loads(line)["status"] in ("ok", "OOM")]
        results.write_text("".join(line + "\n" for line in keep))


def _decide(results: Path, c, deadline: float) -> str:
    done = _done(results).get(key(c))
    if done is not None:
        return "done" if done["status"] != "started" else "crashed (process died or hung)"
    if ONLY and key(c) not in ONLY:
        return "not selected"
    cost = COST_S[c[3]] * max(1, ACCUM // 2) * max(1.0, STEPS / 8)
    return "skipped (time budget)" if time.time() + cost > deadline else "run"


def run(work: Path, gpus: int, deadline: float) -> None:
    """Every configuration for ``gpus`` ranks; rank 0 decides, records and broadcasts each decision."""
    import shutil

    import torch

    from salatrain.train import compose_train, run_stage
    from salatrain.train.engine import init_distributed, release

    dist = init_distributed()
    results, spec = work / "results.jsonl", size_of(work)
    peak = json.loads((work / "peak.json").read_text())["tflops"]
    for c in [c for c in configs() if c[4] == gpus]:
        k = key(c)
        decision = [_decide(results, c, deadline) if dist.is_main else None]
        torch.distributed.broadcast_object_list(decision, src=0)
        if decision[0] != "run":
            if dist.is_main and decision[0] not in ("done", "not selected"):
                _record(results, {"key": k, "status": decision[0]})
            continue
        if dist.is_main:
            _record(results, {"key": k, "status": "started"})
            shutil.rmtree(work / "runs" / k, ignore_errors=True)
            print(f"[run] {k}", flush=True)
        torch.distributed.barrier()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        row = {"key": k, "model": c[0], "stage": c[1], "zero": c[2], "seq_len": spec[c[3]], "gpus": gpus,
               "sequence_parallel": sp_of(c)}
        try:
            run_stage(compose_train("tiny", overrides(work, c, peak)))
            row.update(_measure(work / "runs" / k), status="ok")
            if PROFILE and dist.is_main and (work / "runs" / k / "profile.md").exists():
                shutil.copy(work / "runs" / k / "profile.md", work / f"profile-{k}.md")
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as e:  # recorded; the next configuration still runs
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if gpus > 1:
                # the other ranks may be waiting in a collective this rank will never join: record, then end the
                # process so the launcher stops them all and bench/train_gpu.sh goes on with the next configuration
                print(f"[run] {k} (rank {dist.rank}): {row['status']}", file=sys.stderr, flush=True)
                if dist.is_main:
                    row["wall_s"] = round(time.time() - t0, 1)
                    _record(results, row)
                os._exit(3)
        row["wall_s"] = round(time.time() - t0, 1)
        release([])  # run_stage released its engines; this frees what a failed run left behind
        if dist.is_main:
            _record(results, row)
            print(f"[run] {k}: {row['status']} {row.get('tokens_per_s', 0):.0f} tok/s "
                  f"mfu {row.get('mfu', 0) * 100:.1f}% ({row['wall_s']} s)", flush=True)


def _measure(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows[2:] if not (PROFILE and r["step"] in PROFILED_STEPS)] or rows
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r.get("mfu") or 0.0 for r in steady),
            "mem_gb": max(r["mem_gb"] for r in rows), "steps": len(rows),
            "tokens_per_s_steps": [round(r["tokens_per_s"]) for r in rows], "loss": rows[-1]["loss"]}


# --------------------------------------------------------------------------------------------------- report


def report(work: Path, out: Path) -> str:
    done = _done(work / "results.jsonl")
    peak, spec = json.loads((work / "peak.json").read_text()), size_of(work)
    m = spec["model"]
    lines = [f"Training throughput on {peak['device']} (measured bf16 matmul peak {peak['tflops'] or 0:.0f} TFLOP/s "
             f"per GPU), DeepSpeed, bf16; models of hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
             f"{m['num_attention_heads']} query / {m['num_key_value_heads']} KV heads, head dim {m['head_dim']}, "
             f"vocab {m['vocab_size']}; hybrid = InfLLM-V2 sparse layers (1/4, uniform) + Lightning layers. Median "
             f"tokens/s after 2 warm-up steps; {ACCUM} micro-batch(es) per optimizer step (micro-batch 2 × "
             f"{_seq(spec, (0, 0, 0, 'short'))} or "
             f"1 × {_seq(spec, (0, 0, 0, 'long'))} rows per GPU); rows of {_seq(spec, (0, 0, 0, 'long'))} and more "
             + ("use activation checkpointing (recompute not counted in MFU)." if LONG_CKPT else
                "without activation checkpointing.")
             + " GPUs “2 (SP 2)”: each row split over both GPUs (trainer.sequence_parallel=2).", "",
             "| model | stage | ZeRO | GPUs | seq | tokens/s | tokens/s/GPU | MFU | peak mem GB | hybrid / dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs():
        r = done.get(key(c))
        if r is None:
            continue
        if r.get("status") != "ok":
            if r.get("status") == "started":
                r = dict(r, status="killed (time limit)")
            lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {_gpus(c)} | {_seq(spec, c)} | {r['status']} | | | | |")
            continue
        dense = done.get(key(("dense", *c[1:])))
        ratio = ""
        if c[0] == "hybrid" and dense and dense.get("status") == "ok":
            ratio = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}×"
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a"
        lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {_gpus(c)} | {_seq(spec, c)} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / c[4]:,.0f} | {mfu} | {r['mem_gb']:.1f} | {ratio} |")
    lines += ["", "1→2 GPU scaling (tokens/s on 2 GPUs / 2 × tokens/s on 1 GPU, ZeRO-2, lm):", ""]
    for model in ("dense", "hybrid"):
        for which in ("short", "long"):
            one, two = done.get(key((model, "lm", 2, which, 1))), done.get(key((model, "lm", 2, which, 2)))
            if one and two and one.get("status") == two.get("status") == "ok":
                lines.append(f"- {model} {_seq(spec, (0, 0, 0, which))}: "
                             f"{two['tokens_per_s'] / (2 * one['tokens_per_s']) * 100:.0f}%")
    split, one = done.get(key(("hybrid", "lm", 2, "xlong", 2, 2))), done.get(key(("hybrid", "lm", 2, "xlong_half", 1)))
    if split and one and split.get("status") == one.get("status") == "ok":
        lines += ["", f"Sequence parallel: hybrid {_seq(spec, (0, 0, 0, 'xlong'))} rows over 2 GPUs vs "
                      f"{_seq(spec, (0, 0, 0, 'xlong_half'))} rows on 1 GPU (the same tokens per GPU): per-GPU "
                      f"throughput {split['tokens_per_s'] / (2 * one['tokens_per_s']) * 100:.0f}% (goal >= 90%); "
                      f"peak memory {split['mem_gb']:.1f} vs {one['mem_gb']:.1f} GB."]
    if SUITE == "scale":
        lines += scaling_lines(done, spec)
    if SUITE == "longest":
        lines += longest_lines(done, spec)
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def scaling_lines(done: dict, spec: dict) -> list[str]:
    """The scaling suite's tables: tokens/s per GPU count and the efficiency against one GPU, per model, ZeRO
    stage and row length; then the 8B-class shape."""
    gpus = (1, 2, 4, 8)
    out = ["", "Scaling (lm; tokens/s, and in brackets tokens/s / (GPUs × tokens/s on 1 GPU)):", "",
           "| model | ZeRO | seq | " + " | ".join(f"{g} GPU" for g in gpus) + " |",
           "|---|---|---|" + "---|" * len(gpus)]
    for which in ("short", "long"):
        for zero in (2, 3):
            for model in ("dense", "hybrid"):
                rows = {g: done.get(key((model, "lm", zero, which, g))) for g in gpus}
                if not any(r and r.get("status") == "ok" for r in rows.values()):
                    continue
                one = rows[1]["tokens_per_s"] if rows[1] and rows[1].get("status") == "ok" else None
                cells = []
                for g in gpus:
                    r = rows[g]
                    if not r or r.get("status") != "ok":
                        cells.append(r["status"] if r else "")
                        continue
                    eff = f" ({r['tokens_per_s'] / (g * one) * 100:.0f}%)" if one and g > 1 else ""
                    cells.append(f"{r['tokens_per_s']:,.0f}{eff}")
                out.append(f"| {model} | {zero} | {_seq(spec, (0, 0, 0, which))} | " + " | ".join(cells) + " |")
    m = spec["model_8b"]
    out += ["", f"8B-class rows (dense8b / hybrid8b): hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
                f"{m['num_attention_heads']} query / {m['num_key_value_heads']} KV heads of {m['head_dim']}, MLP "
                f"{m['intermediate_size']}, vocab {m['vocab_size']}; ZeRO-3, activation checkpointing."]
    return out


def longest_lines(done: dict, spec: dict) -> list[str]:
    """The longest row of the hybrid that trained on 1 GPU and on 2 (SP=2), and the first length that did not."""
    out = [""]
    for gpus in (1, 2):
        tried = sorted((c for c in LONGEST_CONFIGS if c[4] == gpus and done.get(key(c))), key=lambda c: spec[c[3]])
        ok = [c for c in tried if done[key(c)].get("status") == "ok"]
        failed = [c for c in tried if done[key(c)].get("status") != "ok"]
        where = "1 GPU" if gpus == 1 else "2 GPUs (SP 2)"
        if not ok:
            first = f" (from {_seq(spec, tried[0])}: {done[key(tried[0])]['status']})" if tried else " (none tried)"
            out.append(f"- {where}: no length trained{first}")
            continue
        best = done[key(ok[-1])]
        stop = next((c for c in failed if spec[c[3]] > spec[ok[-1][3]]), None)
        out.append(f"- {where}: longest row that trained {_seq(spec, ok[-1])} ({best['tokens_per_s']:,.0f} tokens/s, "
                   f"peak {best['mem_gb']:.1f} GB per GPU)"
                   + (f"; {_seq(spec, stop)}: {done[key(stop)]['status']}" if stop else
                      "; no longer length was tried or failed"))
    return out


def _gpus(c) -> str:
    return f"{c[4]} (SP {sp_of(c)})" if sp_of(c) > 1 else str(c[4])


def _seq(spec: dict, c) -> str:
    n = spec[c[3]]
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=["build", "run", "report"])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--deadline", type=float, default=float("inf"), help="unix time after which nothing starts")
    p.add_argument("--out", type=Path)
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="build: full (GPU) or small (CPU rehearsal)")
    p.add_argument("--with-8b", action="store_true", help="build: also the 8B-class models of the scaling suite")
    a = p.parse_args()
    if a.phase == "build":
        build(a.work, a.size, a.with_8b)
    elif a.phase == "run":
        run(a.work, a.gpus, a.deadline)
    else:
        print(report(a.work, a.out or a.work / "train_bench.md"), end="")


if __name__ == "__main__":
    main()
