"""Where `salatrain train` spends a step on a small model: align and distill of SmolLM2-135M's hybrid (GPU).

Run by bench/profile_gpu.sh; its phases:

    python bench/profile_train.py build --work W --shape DIR [--model DIR]
        the dense teacher (the real model from --model, else random weights in the shape of DIR's config.json
        with DIR's tokenizer: speed does not depend on the weights), a code corpus, and the uniform 25% hybrid
    python bench/profile_train.py run --work W --name NAME --stage distill|align [--before] [key=value ...]
        one short `salatrain train` run with trainer.profile_steps (phase times, then one step's kernels);
        --before runs the code installed in /tmp/before (the previous release) instead of this checkout
    python bench/profile_train.py report --work W --out FILE
        markdown: tokens/s and MFU per run (median of the unprofiled steps after the first four) and each
        run's profile.md

On CPU (``--size small``) the same flow runs on a tiny random model for a rehearsal; numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SEQ = {"full": 4096, "small": 256}
ROWS = {"full": (8, 32), "small": (1, 2)}  # (micro-batch rows, rows per optimizer step)
STEPS, PROFILE = 16, (12, 13)  # 11 steps of warm-up (Triton autotuning), 12-13 timed by phase, 14 traced


def build(work: Path, shape: Path, model: str | None, size: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from salatrain.pipeline.steps import write_corpus

    work.mkdir(parents=True, exist_ok=True)
    dense = work / "dense"
    if not (dense / "config.json").exists():
        if not model and not (shape / "tokenizer.json").is_file():
            sys.exit(f"--shape {shape} needs config.json and the tokenizer files of the model (every file of "
                     "SmolLM2-135M's directory but the weights)")
        # built beside, then renamed: a build that fails half-way leaves nothing a later call would take as done
        tmp = work / "dense.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        if model:
            shutil.copytree(model, tmp)
        else:
            cfg = json.loads((shape / "config.json").read_text())
            if size == "small":
                cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16)
            torch.manual_seed(0)
            m = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
            m.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(shape).save_pretrained(tmp)
        shutil.rmtree(dense, ignore_errors=True)
        tmp.rename(dense)
    corpus = work / "corpus"
    if not (corpus / "corpus.json").exists():  # written last: a corpus cut short is rebuilt
        write_corpus(corpus, ["stdlib", "site"], 12_000_000 if size == "full" else 400_000, 10_000, 20)
    hybrid = work / "hybrid"
    if not (hybrid / "config.json").exists():
        # the sparse settings of recipes/pipeline_halo_smollm2.yaml (SALA's, scaled down 4x)
        cli([ "convert", f"model={dense}", f"output_dir={hybrid}", "plan.method=uniform", "kl_check=false",
             "sparse.topk=16", "sparse.window_size=512", "sparse.dense_len=1024"], before=False)


def cli(args: list[str], before: bool, log: Path | None = None) -> int:
    env = dict(os.environ)
    if before:
        env["PYTHONPATH"] = "/tmp/before" + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from salatrain.cli import main; sys.exit(main(sys.argv[1:]))"
    # -P: without it `python -c` puts the working directory (this checkout) first on sys.path, ahead of
    # PYTHONPATH, and --before would time this checkout's code
    out = open(log, "w") if log else None
    try:
        return subprocess.run([sys.executable, "-P", "-c", code, *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    finally:
        if out:
            out.close()


def run(work: Path, name: str, stage: str, before: bool, size: str, extra: list[str]) -> None:
    seq, (micro, rows) = SEQ[size], ROWS[size]
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    common = [f"data.files=[{work / 'corpus' / 'train.jsonl'}]", f"output_dir={out}", f"trainer.seq_len={seq}",
              f"trainer.micro_batch_size={micro}", f"trainer.global_batch_tokens={seq * rows}",
              f"trainer.max_steps={STEPS}", f"trainer.profile_steps=[{PROFILE[0]},{PROFILE[1]}]",
              "trainer.save_final=false", "trainer.save_every=0", "optim.warmup_steps=0",
              "logging.wandb.mode=disabled", "deepspeed.zero_stage=2"]
    if size == "small":
        common += ["trainer.precision=fp32"]
    if stage == "distill":
        args = ["train", "recipe=halo_distill", f"model.path={work / 'hybrid'}", f"teacher.path={work / 'dense'}",
                "stage.sparse_attention=false"]
    else:
        args = ["train", "recipe=halo_align", f"model.path={work / 'dense'}"]
    out.mkdir(parents=True, exist_ok=True)
    rc = cli(args + common + extra, before, log=work / "runs" / f"{name}.log")
    (out / "meta.json").write_text(json.dumps({"name": name, "stage": stage, "before": before, "rc": rc,
                                               "extra": extra, "seq_len": seq, "rows": rows}))
    print(f"{name}: exit {rc}", flush=True)


def report(work: Path, out: Path) -> str:
    lines = ["| run | code | stage | tokens/s | MFU | peak GB | exit |", "|---|---|---|---|---|---|---|"]
    details = []
    for meta_file in sorted((work / "runs").glob("*/meta.json")):
        meta = json.loads(meta_file.read_text())
        run_dir = meta_file.parent
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").exists() else []
        clean = [r for r in rows if r["step"] > 4 and not PROFILE[0] <= r["step"] <= PROFILE[1] + 1]
        tps = statistics.median(r["tokens_per_s"] for r in clean) if clean else None
        mfu = statistics.median(r["mfu"] for r in clean if "mfu" in r) if any("mfu" in r for r in clean) else None
        mem = max((r.get("mem_gb", 0) for r in rows), default=None)
        lines.append(f"| {meta['name']} | {'before' if meta['before'] else 'this'} | {meta['stage']} | "
                     f"{tps:,.0f} | {'' if mfu is None else f'{mfu:.1%}'} | {mem:.1f} | {meta['rc']} |"
                     if tps else f"| {meta['name']} | {'before' if meta['before'] else 'this'} | {meta['stage']} "
                                 f"| - | - | - | {meta['rc']} |")
        prof = run_dir / "profile.md"
        if prof.exists():
            details += ["", f"### {meta['name']}", "", prof.read_text()]
        elif meta["rc"]:
            log = (work / "runs" / f"{meta['name']}.log").read_text().splitlines()[-8:]
            details += ["", f"### {meta['name']} (failed)", "", "```", *log, "```"]
    text = "\n".join(lines + details) + "\n"
    out.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["build", "run", "report"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", type=Path, default=ROOT / ".gpu" / "smollm2-shape")
    ap.add_argument("--model")
    ap.add_argument("--size", default="full", choices=["full", "small"])
    ap.add_argument("--name")
    ap.add_argument("--stage", choices=["distill", "align"])
    ap.add_argument("--before", action="store_true")
    ap.add_argument("--out", type=Path)
    args, extra = ap.parse_known_args()
    if args.phase == "build":
        build(args.work, args.shape, args.model, args.size)
    elif args.phase == "run":
        run(args.work, args.name, args.stage, args.before, args.size, extra)
    else:
        print(report(args.work, args.out))


if __name__ == "__main__":
    main()
