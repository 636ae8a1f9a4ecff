"""Conversion quality: the dense teacher vs the hybrid with a HALO-selected layer plan vs a uniform plan, both
distilled with the same tokens, scored at the teacher's context length L and at 2L (docs/quality.md).

    python bench/quality.py --preset cpu   --out /tmp/quality-cpu     # SmolLM2-135M on a CPU (hours)
    python bench/quality.py --preset gpu   --out /tmp/quality-gpu     # pretrains a teacher first; one H100
    python bench/quality.py --preset small --out /tmp/quality-small   # CPU rehearsal of the gpu preset

Steps, each the salatrain command a user would type (run in this process), folders under --out:
    teacher/   (--preset gpu/small) a Llama-style dense model with 16 query heads per KV head, pretrained here for
               a few minutes on the machine's Python library sources with a BPE tokenizer trained on them, a
               quarter of its rows synthetic retrieval samples (the probe tasks, training seeds) so that it
               can retrieve and the plans have something to keep or lose
    corpus/    train.jsonl / heldout.jsonl (docs and sources, split by document); retrieval.jsonl (gpu/small:
               retrieval samples, 20% of the training tokens, for align and distill)
    align/     salatrain train recipe=halo_align          (one align run serves both plans)
    select/    salatrain select method=halo (sweep)        uniform/: salatrain select method=uniform
    halo/, uniform/                 salatrain convert     (the aligned Lightning layers, the same sparse settings)
    halo_distill/, uniform_distill/ salatrain train recipe=halo_distill, equal tokens
    eval/      salatrain eval model=<halo> compare=[<uniform>,<teacher>] at L and 2L
Prints a markdown table and writes it to <out>/table.md, with everything measured in <out>/results.json.
With --deadline (epoch seconds) the distillation budget shrinks to what fits, the same for both plans.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    # SmolLM2-135M (30 layers, 9 query / 3 KV heads, context 8192) on a 2-core CPU: sparse layers through the
    # PyTorch reference; long sequences go through the cache in chunks (eval chunk_tokens) to bound memory.
    "cpu": dict(
        teacher="smollm2", context=8192, train_seq=256, align_tokens=3072, align_batch=256, align_lr=1e-2,
        distill_tokens=10240, distill_batch=256, distill_lr=3e-4, precision="fp32", corpus_bytes=2_000_000,
        sweep_len=256, sweep_samples=2, sweep_tasks=["passkey"], sweep_text=256,
        eval_tasks=["passkey"], eval_samples=2, eval_text_windows=1, chunk_tokens=2048,
        sparse=dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=16, window_size=512,
                    dense_len=2048, use_rope=True),
    ),
    # A pretrained-here teacher on one H100: 16 layers, hidden 1024, 16 query heads per KV head (the InfLLM-V2
    # kernels' tile), context 1024. Budgets sized for < 9 minutes including the pretraining.
    "gpu": dict(
        pretrain=dict(seconds=180, hidden=1024, layers=16, heads=16, kv_heads=1, intermediate=2816, vocab=8192,
                      batch_rows=32, lr=1.5e-3, text_bytes=100_000_000, retrieval_mix=0.25,
                      retrieval_lengths=[512, 1024], retrieval_pool=400),
        retrieval_corpus=dict(fraction=0.2, lengths=[512, 1024]),
        context=1024, train_seq=1024, align_tokens=2_097_152, align_batch=32768, align_lr=1e-3,
        distill_tokens=3_145_728, distill_batch=32768, distill_lr=3e-4, precision="bf16", corpus_bytes=12_000_000,
        sweep_len=1024, sweep_samples=8, sweep_tasks=["passkey", "niah_multikey", "kv_retrieval"], sweep_text=4096,
        eval_tasks=["passkey", "niah_multikey", "kv_retrieval", "variable_tracking"], eval_samples=16,
        eval_text_windows=16, chunk_tokens=None,
        sparse=dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, topk=4, window_size=256,
                    dense_len=512, use_rope=False),
    ),
    # The gpu preset in miniature, for a CPU rehearsal of the whole script (a minute or two).
    "small": dict(
        pretrain=dict(seconds=20, hidden=64, layers=12, heads=16, kv_heads=1, intermediate=128, vocab=512,
                      batch_rows=8, lr=3e-3, text_bytes=3_000_000, retrieval_mix=0.25, retrieval_lengths=[256],
                      retrieval_pool=20, retrieval_tasks=["passkey"]),
        retrieval_corpus=dict(fraction=0.2, lengths=[256]),
        context=256, train_seq=128, align_tokens=512, align_batch=256, align_lr=1e-2,
        distill_tokens=512, distill_batch=256, distill_lr=1e-3, precision="fp32", corpus_bytes=300_000,
        sweep_len=256, sweep_samples=1, sweep_tasks=["passkey"], sweep_text=128,
        eval_tasks=["passkey"], eval_samples=1, eval_text_windows=1, chunk_tokens=None,
        sparse=dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, topk=2, window_size=32,
                    dense_len=128, use_rope=False),
    ),
}


def log(msg: str) -> None:
    print(f"[quality +{time.time() - T0:.0f}s] {msg}", flush=True)


def salatrain(*args: str) -> None:
    """One salatrain command, in this process (exits on a user error, as the CLI would)."""
    from salatrain.cli import main

    t = time.time()
    log("salatrain " + " ".join(args))
    rc = main(list(args))
    if rc != 0:
        sys.exit(f"salatrain {args[0]} failed (exit {rc})")
    log(f"{args[0]} done in {time.time() - t:.0f} s")


def hydra_list(items) -> str:
    return "[" + ",".join(str(i) for i in items) + "]"


# ---------------------------------------------------------------------------------------------- the teacher

TRAIN_PROBE_SEED = 10_000  # retrieval samples for training; eval uses seed 0 and the sweep seed 1: no overlap


def retrieval_samples(tok, tasks, lengths, per_task: int, seed: int) -> list[list[int]]:
    """Token ids (prompt + answer) of synthetic retrieval samples of every task at every length."""
    from salatrain.eval.probes import make_samples

    return [list(s.prompt_ids + s.answer_ids) for task in tasks for n in lengths
            for s in make_samples(tok, task, n, per_task, seed)]


def write_retrieval_corpus(path: Path, tok, text_tokens: int, fraction: float, tasks, lengths) -> int:
    """jsonl of retrieval samples as text, about fraction / (1 - fraction) × text_tokens tokens in all."""
    want = int(text_tokens * fraction / (1 - fraction))
    per_task = max(1, want // (len(tasks) * sum(lengths)))
    rows = retrieval_samples(tok, tasks, lengths, per_task, TRAIN_PROBE_SEED + 1)
    with open(path, "w") as fh:
        for ids in rows:
            fh.write(json.dumps({"text": tok.decode(ids, skip_special_tokens=True)}) + "\n")
    return sum(len(r) for r in rows)


def pretrain_teacher(out: Path, p: dict, context: int, device: str) -> Path:
    """A dense Llama (GQA 16:1) trained for p["seconds"] on the Python sources of this machine."""
    import numpy as np
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from salatrain.eval.text import builtin_documents

    if (out / "config.json").is_file():
        log(f"teacher: reusing {out}")
        return out
    texts, size = [], 0
    for source in ("stdlib", "site"):
        for _, text in builtin_documents(source):
            texts.append(text)
            size += len(text)
            if size >= p["text_bytes"]:
                break
        if size >= p["text_bytes"]:
            break
    log(f"teacher: {len(texts)} source files, {size / 1e6:.0f} MB; training a {p['vocab']}-token BPE")
    bpe = ByteLevelBPETokenizer()
    sample = texts[:: max(1, len(texts) // 2000)]
    bpe.train_from_iterator(sample, vocab_size=p["vocab"], min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token=None)
    eos = tok.eos_token_id
    data = torch.from_numpy(np.concatenate([np.array(enc.ids + [eos], dtype=np.int32)
                                            for enc in bpe.encode_batch(texts)]))
    log(f"teacher: {data.numel() / 1e6:.1f}M tokens")
    mix = p.get("retrieval_mix", 0.0)
    tasks = p.get("retrieval_tasks", ["passkey", "niah_multikey", "kv_retrieval", "variable_tracking"])
    pool = retrieval_samples(tok, tasks, p["retrieval_lengths"], p["retrieval_pool"], TRAIN_PROBE_SEED) if mix else []
    n_probe = round(mix * p["batch_rows"])
    if pool:
        log(f"teacher: {n_probe} of {p['batch_rows']} rows per step are retrieval samples (a pool of {len(pool)}: "
            f"{', '.join(tasks)} at {p['retrieval_lengths']} tokens), the rest text")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], head_dim=p["hidden"] // p["heads"],
                      max_position_embeddings=2 * context, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=eos, eos_token_id=eos)
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    t0, step, tokens = time.time(), 0, 0
    while (elapsed := time.time() - t0) < p["seconds"]:
        frac = elapsed / p["seconds"]
        lr = p["lr"] * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, data.numel() - context, (p["batch_rows"] - n_probe,), generator=gen)
        rows = [data[s : s + context].long() for s in starts.tolist()]
        labels = list(rows)
        for i in torch.randint(0, max(1, len(pool)), (n_probe,), generator=gen).tolist():
            ids = torch.tensor(pool[i][:context], dtype=torch.long)
            pad = context - ids.numel()
            rows.append(torch.cat([ids, ids.new_full((pad,), eos)]))
            labels.append(torch.cat([ids, ids.new_full((pad,), -100)]))
        batch, labels = torch.stack(rows).to(device), torch.stack(labels).to(device)
        with autocast:
            loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + batch.numel()
        if step % 50 == 0:
            log(f"teacher: step {step}, loss {loss.item():.3f}, {tokens / (time.time() - t0):.0f} tok/s")
    log(f"teacher: {step} steps, {tokens / 1e6:.1f}M tokens, final loss {loss.item():.3f}")
    out.mkdir(parents=True, exist_ok=True)
    model.float().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"steps": step, "tokens": tokens, "loss": loss.item(),
                                                   "seconds": round(time.time() - t0, 1), **p}, indent=2))
    return out


# ---------------------------------------------------------------------------------------------- conversion


def train_args(c: dict, recipe: str, tokens: int, batch: int, lr: float, out: Path, **paths) -> list[str]:
    args = ["train", f"recipe={recipe}", f"output_dir={out}", f"data.files=[{paths.pop('data')}]",
            f"trainer.seq_len={c['train_seq']}", f"trainer.global_batch_tokens={batch}",
            f"trainer.micro_batch_size={max(1, min(8, batch // c['train_seq']))}",
            f"trainer.max_steps={max(1, tokens // batch)}", f"trainer.precision={c['precision']}",
            "trainer.save_every=0", f"optim.lr={lr}", "optim.warmup_steps=0", "deepspeed.zero_stage=0",
            "logging.wandb.mode=disabled"]
    return args + [f"{k}.path={v}" for k, v in paths.items()]


RESERVE_AFTER_PRETRAIN_S = 270  # corpus, align, select, convert x2, distill x2, eval at the gpu preset's sizes
RESERVE_AFTER_DISTILL_S = 100  # two stage start-ups (kernel compiles) and exports, eval


def pretrain_seconds(p: dict, deadline: float | None) -> float:
    if deadline is None:
        return p["seconds"]
    seconds = min(p["seconds"], max(30.0, deadline - time.time() - RESERVE_AFTER_PRETRAIN_S))
    if seconds < p["seconds"]:
        log(f"deadline: pretraining cut from {p['seconds']} s to {seconds:.0f} s")
    return seconds


def distill_budget(c: dict, out: Path, deadline: float | None) -> int:
    """Distillation tokens per plan: as configured, or what fits before the deadline (both plans equal)."""
    tokens = c["distill_tokens"]
    if deadline is None:
        return tokens
    rows = [json.loads(line) for line in (out / "align" / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
    align_rate = rates[len(rates) // 2]
    rate = align_rate / 1.5  # distillation vs align: measured 1.1-1.4x slower per token on an H200
    fit = int(rate * max(0.0, deadline - time.time() - RESERVE_AFTER_DISTILL_S) / 2)
    fit -= fit % c["distill_batch"]
    if fit < tokens:
        log(f"deadline: distillation cut from {tokens} to {max(fit, c['distill_batch'])} tokens per plan "
            f"(align ran at {align_rate:.0f} tok/s)")
    return max(c["distill_batch"], min(tokens, fit))


def run(c: dict, out: Path, device: str, deadline: float | None) -> dict:
    from salatrain.pipeline.steps import write_corpus

    if "pretrain" in c:
        p = {**c["pretrain"], "seconds": pretrain_seconds(c["pretrain"], deadline)}
        teacher = pretrain_teacher(out / "teacher", p, c["context"], device)
    else:
        from salatrain.realmodel import smollm2_dir

        teacher = smollm2_dir() if c["teacher"] == "smollm2" else Path(c["teacher"])
    sources = ["pydoc", "stdlib"] + (["site"] if "pretrain" in c else [])
    if not (out / "corpus" / "train.jsonl").is_file():
        write_corpus(out / "corpus", sources, c["corpus_bytes"], c["corpus_bytes"] // 20, 20)
    data, held = out / "corpus" / "train.jsonl", out / "corpus" / "heldout.jsonl"
    if "retrieval_corpus" in c:  # the same task mix the teacher saw, so distillation can transfer it
        from transformers import AutoTokenizer

        probes = out / "corpus" / "retrieval.jsonl"
        if not probes.is_file():
            rc = c["retrieval_corpus"]
            tok = AutoTokenizer.from_pretrained(teacher)
            text_tokens = sum(len(tok(json.loads(line)["text"]).input_ids) for line in data.open())
            n = write_retrieval_corpus(probes.with_suffix(".tmp"), tok, text_tokens, rc["fraction"], c["eval_tasks"],
                                       rc["lengths"])
            probes.with_suffix(".tmp").rename(probes)
            log(f"corpus: {text_tokens / 1e6:.1f}M text tokens + {n / 1e6:.2f}M tokens of retrieval samples")
        data = f"{data},{probes}"
    if not (out / "align" / "align_report.json").is_file():
        salatrain(*train_args(c, "halo_align", c["align_tokens"], c["align_batch"], c["align_lr"], out / "align",
                              data=data, model=teacher))
    sweep = [f"sweep.probes.tasks={hydra_list(c['sweep_tasks'])}", f"sweep.probes.lengths=[{c['sweep_len']}]",
             f"sweep.probes.num_samples={c['sweep_samples']}", "sweep.probes.seed=1", f"sweep.text.files=[{held}]",
             f"sweep.text.seq_len={min(c['context'], c['sweep_text'])}", f"sweep.text.max_tokens={c['sweep_text']}"]
    plans = {"halo": ["select", f"model={teacher}", f"aligned={out / 'align'}", "method=halo", *sweep],
             "uniform": ["select", f"model={teacher}", "method=uniform"]}
    sparse = [f"sparse.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in c["sparse"].items()]
    for name, select_args in plans.items():
        if not (out / f"{name}_plan" / "layer_plan.json").is_file():
            salatrain(*select_args, f"output_dir={out / f'{name}_plan'}", "overwrite=true")
        if not (out / name / "config.json").is_file():
            salatrain("convert", f"model={teacher}", f"plan.file={out / f'{name}_plan' / 'layer_plan.json'}",
                      f"aligned={out / 'align'}", f"output_dir={out / name}", "overwrite=true", *sparse)
    tokens = distill_budget(c, out, deadline)
    for name in plans:
        if not (out / f"{name}_distill" / "stage_report.json").is_file():
            salatrain(*train_args(c, "halo_distill", tokens, c["distill_batch"], c["distill_lr"],
                                  out / f"{name}_distill", data=data, model=out / name, teacher=teacher))
    lengths = [c["context"], 2 * c["context"]]
    if not (out / "eval" / "eval.json").is_file():
        salatrain("eval", f"model={out / 'halo_distill'}", f"compare=[{out / 'uniform_distill'},{teacher}]",
                  "names=[halo,uniform,teacher]", f"output_dir={out / 'eval'}", "overwrite=true",
                  f"probes.tasks={hydra_list(c['eval_tasks'])}", f"probes.lengths={hydra_list(lengths)}",
                  f"probes.num_samples={c['eval_samples']}", f"perplexity.files=[{held}]",
                  f"perplexity.seq_lens={hydra_list(lengths)}",
                  f"perplexity.max_tokens={c['eval_text_windows'] * 2 * c['context']}",
                  *([f"chunk_tokens={c['chunk_tokens']}"] if c["chunk_tokens"] else []))
    return summarize(c, out, teacher, tokens)


def summarize(c: dict, out: Path, teacher: Path, distill_tokens: int) -> dict:
    ev = json.loads((out / "eval" / "eval.json").read_text())
    plans = {n: json.loads((out / f"{n}_plan" / "layer_plan.json").read_text())["sparse_layers"]
             for n in ("halo", "uniform")}
    align = json.loads((out / "align" / "stage_report.json").read_text())
    distill = {n: json.loads((out / f"{n}_distill" / "stage_report.json").read_text()) for n in plans}
    names = ["teacher", "halo", "uniform"]
    lengths = sorted(int(x) for x in ev["results"]["teacher"]["perplexity"])
    head = ["model", "sparse layers"] + [f"ppl @{n}" for n in lengths]
    tasks = list(ev["results"]["teacher"]["probes"])
    for t in tasks:
        head += [f"{t} @{n} (exact / log-p)" for n in lengths]
    rows = []
    for m in names:
        r = ev["results"][m]
        row = [m, "all dense" if m == "teacher" else str(plans[m])]
        row += [f"{r['perplexity'][str(n)]['perplexity']:.2f}" for n in lengths]
        for t in tasks:
            row += [f"{r['probes'][t][str(n)]['exact_match']:.2f} / {r['probes'][t][str(n)]['answer_logprob']:.2f}"
                    for n in lengths]
        rows.append(row)
    table = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])
    results = {"preset": c, "teacher": str(teacher), "plans": plans, "align": align, "distill": distill,
               "distill_tokens_per_plan": distill_tokens, "eval": ev["results"],
               "eval_samples": ev["settings"]["probes"]["num_samples"], "seconds": round(time.time() - T0, 1)}
    if (out / "teacher" / "pretrain.json").is_file():
        results["pretrain"] = json.loads((out / "teacher" / "pretrain.json").read_text())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(table)
    log(f"align {align['tokens']} tokens, distillation {distill['halo']['tokens']} tokens per plan; "
        f"results in {out}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds by which to be done")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="preset overrides (JSON values)")
    a = ap.parse_args()
    import torch

    c = json.loads(json.dumps(PRESETS[a.preset]))
    for kv in a.set:
        key, value = kv.split("=", 1)
        c[key] = json.loads(value)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.out.mkdir(parents=True, exist_ok=True)
    log(f"preset {a.preset} on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; out {a.out}")
    run(c, a.out, device, a.deadline)


T0 = time.time()
if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
