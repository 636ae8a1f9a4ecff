"""Run a pipeline: ordered steps, each in ``<output_dir>/<nn>_<step>/``, resumable step by step.

Before anything runs, every step is prepared (its command line built from the recipe and the folders of the
steps before it) and its config composed and validated, so a misspelt key in the last step fails at once.
A finished step leaves ``.pipeline_step.json`` (its command, a hash of it, timings) in its folder and is skipped
when the pipeline runs again with the same command; a different command for a finished step is an error
unless ``restart_from=<step>`` (which deletes that step's folder and every later one). An unfinished train
step resumes from its last checkpoint (the stage's ``resume=auto``); other steps write atomically and rerun.
A step that runs deletes the folders of the steps after it, which read its output.
``<output_dir>/pipeline.json`` records the steps, their commands, status and seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..hf_checkpoint import CheckpointDir
from ..eval.report import check_wandb, format_table, write_json_atomic
from .config import PipelineConfig
from ..rundir import OutputDir
from .steps import Prepared, prepare

log = logging.getLogger(__name__)
MARKER = ".pipeline_step.json"


@dataclasses.dataclass
class Step:
    index: int
    name: str
    kind: str
    dir: Path
    prepared: Prepared

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.prepared.command).encode()).hexdigest()[:16]


def resolve_model(model: str | None) -> str:
    if not model:
        raise UserError("missing model=<dense HF checkpoint dir> (or model=smollm2 for the offline SmolLM2-135M)")
    if model == "smollm2":
        from ..realmodel import smollm2_dir

        return str(smollm2_dir())
    from ..hf_checkpoint import CheckpointDir

    ckpt = CheckpointDir(model)
    if ckpt.model_type == "sala_hybrid":
        raise UserError(f"model={ckpt.path} is a hybrid checkpoint; a pipeline starts from the dense base model")
    return str(ckpt.path.resolve())


def plan_steps(cfg: PipelineConfig, base: str) -> list[Step]:
    out = Path(cfg.output_dir).expanduser().resolve()
    ctx = {"base": base, "artifacts": {}, "wandb": _wandb(cfg)}
    if cfg.data:
        ctx["artifacts"]["data"] = [str(Path(f).expanduser()) for f in cfg.data]
    if cfg.heldout:
        ctx["artifacts"]["heldout"] = [str(Path(f).expanduser()) for f in cfg.heldout]
    given = set(ctx["artifacts"])  # the user's data / heldout win over what a corpus step writes
    steps = []
    for index, (name, spec) in enumerate(cfg.steps.items(), start=1):
        if not spec.enabled:
            continue
        step_dir = out / f"{index:02d}_{name}"
        prepared = prepare(spec.kind, name, spec, step_dir, ctx)
        ctx["artifacts"].update({k: v for k, v in prepared.outputs.items() if k not in given})
        steps.append(Step(index, name, spec.kind, step_dir, prepared))
    if not steps:
        raise UserError("the pipeline has no enabled steps")
    return steps


def _wandb(cfg: PipelineConfig) -> dict:
    w = cfg.logging.wandb
    return {"mode": w.mode, "project": w.project, "entity": w.entity, "group": w.group or cfg.name}


def output_dir(cfg: PipelineConfig, base: str | None = None) -> OutputDir:
    """The pipeline's folder, checked against what it reads: the model, data, held-out text, corpus files."""
    out = OutputDir(cfg.output_dir, "pipeline", overwrite=cfg.overwrite, reuse=True)
    inputs = {"model": base or (cfg.model if cfg.model != "smollm2" else None), "data": list(cfg.data),
              "heldout": list(cfg.heldout)}
    for name, spec in cfg.steps.items():
        if spec.kind == "corpus" and isinstance(spec.args.get("sources"), (list, tuple)):
            inputs[f"steps.{name}.args.sources"] = [str(s) for s in spec.args["sources"]]
    out.check(inputs)
    return out


def validate(cfg: PipelineConfig) -> tuple[str, list[Step]]:
    output_dir(cfg)
    check_wandb(cfg.logging)
    if cfg.restart_from is not None and cfg.restart_from not in cfg.steps:
        raise UserError(f"restart_from={cfg.restart_from!r} is not a step of this pipeline ({', '.join(cfg.steps)})")
    base = resolve_model(cfg.model)
    output_dir(cfg, base)
    steps = plan_steps(cfg, base)
    for step in steps:
        step.prepared.check()
    return base, steps


def command_line(step: Step) -> str:
    head, *rest = step.prepared.command
    prog = ["(built in)", head] if step.kind == "corpus" else ["salatrain", head]
    return " ".join([*prog, *(shlex.quote(a) for a in rest)])


def run_pipeline(cfg: PipelineConfig) -> dict:
    base, steps = validate(cfg)
    if cfg.dry_run:
        for s in steps:
            print(f"[{s.index:02d}] {s.name} ({s.kind}) -> {s.dir}\n    {command_line(s)}")
        return {"dry_run": True, "steps": [s.name for s in steps]}
    with output_dir(cfg, base) as out_dir:
        return _run(cfg, base, steps, out_dir)


def _run(cfg: PipelineConfig, base: str, steps: list[Step], out_dir: OutputDir) -> dict:
    t0 = time.time()
    out = out_dir.create().resolve()
    fingerprint = CheckpointDir(base).fingerprint()
    if cfg.restart_from is not None:
        _restart(steps, cfg.restart_from)
    else:
        _check_same_model(out / "pipeline.json", base, fingerprint, steps)
    record = {"format": "salatrain.pipeline/1", "name": cfg.name, "model": base, "model_fingerprint": fingerprint,
              "output_dir": str(out), "steps": []}
    for n, step in enumerate(steps, start=1):
        row = _run_step(step, n, len(steps))
        if row["status"] == "ran":
            _invalidate(steps[n:], f"{step.name} ran again")
        record["steps"].append(row)
        record["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(out / "pipeline.json", record)
    _summary(cfg, record, steps)
    return record


def _check_same_model(record: Path, base: str, fingerprint: str, steps: list[Step]) -> None:
    """Finished steps are skipped only while the model they started from is the one they were run on."""
    try:
        before = json.loads(record.read_text()).get("model_fingerprint") if record.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        before = None
    if before is not None and before != fingerprint and any((s.dir / MARKER).is_file() for s in steps):
        raise UserError(f"the model {base} changed since this pipeline's finished steps ran (fingerprint "
                        f"{before} != {fingerprint}); pass restart_from={steps[0].name} to redo every step, or use "
                        "a new output_dir")


def _restart(steps: list[Step], name: str) -> None:
    start = next(i for i, s in enumerate(steps) if s.name == name)
    _invalidate(steps[start:], f"restart_from={name}")


def _invalidate(steps: list[Step], why: str) -> None:
    """Later steps read what an earlier one wrote: when it runs again, their folders go."""
    for s in steps:
        if s.dir.exists():
            _say(f"{why}: deleting {s.dir}")
            shutil.rmtree(s.dir)


def _run_step(step: Step, n: int, total: int) -> dict:
    marker = step.dir / MARKER
    row = {"index": step.index, "name": step.name, "kind": step.kind, "dir": str(step.dir),
           "command": command_line(step), "outputs": step.prepared.outputs}
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            done = None
        if not isinstance(done, dict) or not isinstance(done.get("seconds"), (int, float)):
            raise UserError(f"{marker} is corrupt; pass restart_from={step.name} to redo that step")
        if done.get("key") != step.key:
            raise UserError(f"step {step.name} in {step.dir} was finished with a different command; pass "
                            f"restart_from={step.name} to redo it and the steps after it, or use a new output_dir")
        _say(f"[{n}/{total}] {step.name} ({step.kind}): done earlier ({done['seconds']} s), skipped")
        return {**row, "status": "skipped", "seconds": done["seconds"]}
    _say(f"[{n}/{total}] {step.name} ({step.kind}) -> {step.dir}\n    {command_line(step)}")
    t = time.time()
    try:
        step.prepared.run()
    except UserError as e:
        raise UserError(f"step {step.name} ({step.kind}) failed: {e}") from None
    seconds = round(time.time() - t, 1)
    step.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"step": step.name, "kind": step.kind, "key": step.key, "seconds": seconds,
                               "command": step.prepared.command, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    _say(f"[{n}/{total}] {step.name} ({step.kind}): done in {seconds} s")
    return {**row, "status": "ran", "seconds": seconds}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _summary(cfg: PipelineConfig, record: dict, steps: list[Step]) -> None:
    rows = [[s["name"], s["kind"], s["status"], f"{s['seconds']:.1f}", s["dir"]] for s in record["steps"]]
    print(format_table(["step", "kind", "status", "seconds", "folder"], rows))
    print(f"total {record['seconds']:.1f} s; record: {Path(record['output_dir']) / 'pipeline.json'}")
    hybrid = next((s.prepared.outputs["hybrid"] for s in reversed(steps) if "hybrid" in s.prepared.outputs), None)
    if hybrid is None:
        return
    gap = quality_gap(steps)
    if gap:
        print("\n" + gap)
    print(f"\nhybrid checkpoint (HF format): {hybrid}\n"
          f"  load: AutoModelForCausalLM.from_pretrained({hybrid!r}, trust_remote_code=True)")
    if cfg.continue_with:
        print(f"continue on a GPU:\n  salatrain train recipe={cfg.continue_with} model.path={hybrid} "
              f"data.files=[<your data>] output_dir=<dir>\n"
              f"  or the whole conversion at full budget: salatrain pipeline recipe=halo model={record['model']} "
              "data=[<your data>] output_dir=<dir>")


def quality_gap(steps: list[Step]) -> str | None:
    """How far the pipeline's hybrid is from its teacher, from the last eval step's eval.json, in plain words,
    with the budget the GPU recipe spends (docs/quality.md)."""
    ev_path = next((Path(s.prepared.outputs["eval"]) for s in reversed(steps) if "eval" in s.prepared.outputs), None)
    if ev_path is None or not ev_path.is_file():
        return None
    ev = json.loads(ev_path.read_text())
    res = ev.get("results", {})
    if "hybrid" not in res or "teacher" not in res:
        return None
    lines = ["how far the hybrid is from its teacher (held-out data):"]
    for seq, p in res["hybrid"]["perplexity"].items():
        t = res["teacher"]["perplexity"].get(seq)
        if t:
            lines.append(f"  perplexity @{seq}: {p['perplexity']:.1f} vs {t['perplexity']:.1f} "
                         f"({p['perplexity'] / t['perplexity']:.1f}x the teacher's)")
    for task, by_len in res["hybrid"]["probes"].items():
        for length, v in by_len.items():
            t = res["teacher"]["probes"].get(task, {}).get(length)
            if t:
                lines.append(f"  {task} @{length} exact match: {v['exact_match']:.2f} vs {t['exact_match']:.2f}")
    trained = sum(json.loads((s.dir / "stage_report.json").read_text()).get("tokens", 0) for s in steps
                  if s.kind == "train" and (s.dir / "stage_report.json").is_file())
    lines.append(f"this run trained on {trained:,} tokens in all; closing the gap takes a GPU budget. On an H200, "
                 "112M tokens (bash bench/quality_gpu.sh plan=uniform, ~16 minutes) brought SmolLM2-135M's hybrid "
                 "to 1.03-1.04x the teacher's held-out prose perplexity and 1.11x on code at two seeds, with 32 of 32 "
                 "passkeys at 2K-16K where the teacher finds none at 16K (docs/quality.md: the exact command and "
                 "budgets)")
    return "\n".join(lines)
