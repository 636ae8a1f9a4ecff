"""Tables of bench/quality_gpu.sh runs: teacher vs each plan's hybrid on held-out prose and code perplexity and
the retrieval probes, the tokens each step spent, and the distillation curve (KL against tokens).

    python bench/quality_report.py --work /tmp/salatrain-quality --out bench-out
    python bench/quality_report.py --results a/results.json b/results.json --out merged   # runs of several machines

Reads <work>/<plan>[-<tag>]-seed<N>/ (the pipeline folders; a tagged recipe variant counts as a plan of its own),
or the results.json files that earlier invocations wrote (runs of one plan with different seeds, made on different
machines); writes <out>/table.md, <out>/results.json and
<out>/distill.png, and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def collect(work: Path) -> dict:
    runs = {}
    for run in sorted(p for p in work.iterdir() if p.is_dir() and "-seed" in p.name):
        ev, code = _json(run / "07_eval" / "eval.json"), _json(run / "08_eval_code" / "eval.json")
        distilled = {kind: _ppl(_json(run / f"09_eval_distilled_{kind}" / "eval.json")) for kind in ("prose", "code")}
        mixers = (_json(run / "04_convert" / "config.json") or {}).get("mixer_types") or []
        steps = {}
        for d in sorted(run.glob("0*_*")):
            rep = _json(d / "stage_report.json")
            if rep:
                steps[d.name.split("_", 1)[1]] = {"tokens": rep.get("tokens"), "steps": rep.get("steps"),
                                                  "final_loss": rep.get("final_loss"), "seconds": rep.get("seconds")}
        curve = []
        metrics = run / "05_distill" / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                r = json.loads(line)
                if r.get("kl") is not None:
                    curve.append((r["tokens"], r["kl"], r.get("tokens_per_s")))
        runs[run.name] = {"eval": ev, "eval_code": code, "sparse_layers": [i for i, m in enumerate(mixers)
                                                                          if m == "sparse_attention"],
                          "steps": steps, "pipeline": _json(run / "pipeline.json"), "distill_curve": curve,
                          "distilled": distilled}
    return runs


def merge(parts: list[dict]) -> dict:
    """One runs dict from several reports' runs; a run name present twice must be the same run."""
    runs: dict = {}
    for part in parts:
        for name, r in part.items():
            if name in runs and runs[name] != r:
                raise SystemExit(f"run {name} appears twice with different results: rename one folder")
            runs[name] = r
    return dict(sorted(runs.items()))


def _ppl(ev, name=None):
    """Perplexity of model ``name`` (default: the eval's first model) in an eval.json, or None."""
    if ev and name is None:
        name = ev["models"][0]["name"]
    if not ev or name not in ev["results"]:
        return None
    p = ev["results"][name]["perplexity"]
    return next(iter(p.values()))["perplexity"] if p else None


def table(runs: dict) -> str:
    rows, teacher = [], None
    lengths, tasks = [], []
    for r in runs.values():  # the teacher first, so every hybrid row gets its ratios
        if r["eval"] and "teacher" in r["eval"]["results"]:
            teacher = (_ppl(r["eval"], "teacher"), _ppl(r["eval_code"], "teacher"))
            break
    teacher_row = None
    for run_name, r in runs.items():
        ev = r["eval"]
        if not ev:
            rows.append(f"| {run_name} | (no eval) |")
            continue
        names = [m["name"] for m in ev["models"]]
        hybrid = names[0]
        tasks = list(ev["results"][hybrid]["probes"])
        lengths = list(next(iter(ev["results"][hybrid]["probes"].values()))) if tasks else []
        for name in ([hybrid] if teacher_row else ["teacher", hybrid]):
            if name not in names:
                continue
            res = ev["results"][name]
            # the code eval names its hybrid by plan (bench/quality_gpu.sh), the pipeline's eval by its own name
            code_names = [m["name"] for m in (r["eval_code"] or {}).get("models", [])]
            code_name = name if name == "teacher" or not code_names else code_names[0]
            prose, code = _ppl(ev, name), _ppl(r["eval_code"], code_name)
            if name == "teacher":
                teacher_row = True
            label = "teacher" if name == "teacher" else f"{run_name} {r['sparse_layers']}"
            cells = [f"{prose:.2f}" if prose else "-", f"{code:.2f}" if code else "-"]
            if name != "teacher" and teacher and teacher[0] and teacher[1] and prose and code:
                cells = [f"{prose:.2f} ({prose / teacher[0]:.2f}×)", f"{code:.2f} ({code / teacher[1]:.2f}×)"]
            for t in tasks:
                for n in lengths:
                    c = res["probes"][t][n]
                    cells.append(f"{c['exact_match']:.2f} / {c['answer_logprob']:.2f}")
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    head = ["model (sparse layers)", "ppl prose @2K", "ppl code @2K"] + [f"{t} @{n}" for t in tasks for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows
    lines += ["", "Probe cells: exact match / mean answer log-probability; perplexity ratios against the teacher.",
              "", "| run | step | tokens | steps | seconds |", "|---|---|---|---|---|"]
    for run_name, r in runs.items():
        for step, s in r["steps"].items():
            lines.append(f"| {run_name} | {step} | {s['tokens']:,} | {s['steps']} | {s['seconds']} |")
        curve = r["distill_curve"]
        if curve:
            tps = sorted(c[2] for c in curve if c[2])
            lines.append(f"| {run_name} | distill median tokens/s | {tps[len(tps) // 2]:,.0f} | | |")
    spread = seed_spread(runs)
    if spread:
        lines += ["", spread]
    before = finetune_effect(runs, teacher)
    if before:
        lines += ["", before]
    return "\n".join(lines) + "\n"


def finetune_effect(runs: dict, teacher) -> str:
    """Held-out perplexity of each hybrid after distillation and after the long-context finetune (runs that
    scored both; ratios to the teacher when it was scored). Empty when no run has the distilled scores."""
    rows = []
    for run_name, r in runs.items():
        d, s = r.get("distilled") or {}, _summary(r)
        if not s or not d or d.get("prose") is None:
            continue
        cells = [run_name]
        for after, before, ref in ((s["prose"], d.get("prose"), teacher and teacher[0]),
                                   (s["code"], d.get("code"), teacher and teacher[1])):
            for v in (before, after):
                cells.append("-" if v is None else f"{v:.2f}" + (f" ({v / ref:.2f}×)" if ref else ""))
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = ["run", "ppl prose after distill", "after finetune", "ppl code after distill", "after finetune"]
    return "\n".join(["The long-context finetune's effect on held-out perplexity (2K windows):", "",
                      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows)


def _summary(r: dict) -> dict | None:
    """A hybrid run's headline numbers: prose and code perplexity, passkey exact match averaged over lengths."""
    ev = r["eval"]
    if not ev:
        return None
    hybrid = ev["models"][0]["name"]
    code_names = [m["name"] for m in (r["eval_code"] or {}).get("models", [])]
    passkey = ev["results"][hybrid]["probes"].get("passkey", {})
    return {"prose": _ppl(ev, hybrid), "code": _ppl(r["eval_code"], code_names[0]) if code_names else None,
            "passkey": sum(c["exact_match"] for c in passkey.values()) / len(passkey) if passkey else None,
            "distill_tokens": (r["steps"].get("distill") or {}).get("tokens")}


def seed_spread(runs: dict) -> str:
    """Per plan run with two seeds or more at the same distillation budget: each seed's numbers and their
    spread (max - min), the yardstick for any difference between plans. Empty if no plan has two seeds."""
    by_plan: dict[tuple, list] = {}
    for run_name, r in runs.items():
        s = _summary(r)
        if s:
            plan, seed = run_name.rsplit("-seed", 1)
            by_plan.setdefault((plan, s["distill_tokens"]), []).append((seed, s))
    rows = []
    for (plan, tokens), seeds in sorted(by_plan.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if len(seeds) < 2:
            continue
        cells = [plan, ", ".join(seed for seed, _ in seeds), f"{tokens:,}" if tokens else "-"]
        for key, fmt in (("prose", ".2f"), ("code", ".2f"), ("passkey", ".2f")):
            vals = [s[key] for _, s in seeds]
            if any(v is None for v in vals):
                cells += ["-", "-"]
                continue
            cells += [" / ".join(format(v, fmt) for v in vals), format(max(vals) - min(vals), fmt)]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = ["plan", "seeds", "distill tokens", "ppl prose", "spread", "ppl code", "spread", "passkey exact (mean "
            "over lengths)", "spread"]
    return "\n".join(["Seed spread (same plan, same distillation tokens):", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)] + rows)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        if r["distill_curve"]:
            tokens, kl, _ = zip(*r["distill_curve"])
            ax.plot([t / 1e6 for t in tokens], kl, label=name)
    ax.set_xlabel("distillation tokens (millions)")
    ax.set_ylabel("KL(teacher ‖ hybrid) per token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, help="the quality runs' work folder (<plan>-seed<N>/ inside)")
    ap.add_argument("--results", type=Path, nargs="+", default=[], help="results.json files of earlier reports")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.work and not args.results:
        ap.error("give --work, --results, or both")
    runs = merge([json.loads(p.read_text()) for p in args.results] + ([collect(args.work)] if args.work else []))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    text = table(runs)
    (args.out / "table.md").write_text(text)
    if any(r["distill_curve"] for r in runs.values()):
        plot(runs, args.out / "distill.png")
    print(text)


if __name__ == "__main__":
    main()
