"""`salatrain select model=<dense dir> aligned=<align output> output_dir=<dir>` (sweep) or
`salatrain select metrics=<metrics.json> output_dir=<dir>`; `method=halo|stepwise|retrieval|uniform|random ratio=0.25`.

Per-layer metrics (a sweep, a metrics file, or none) → layer_plan.json + scores.png.

Output folder (written all at once, so a failure leaves nothing):
    layer_plan.json   {"format": "salatrain.layer_plan/1", "mixer_types": [...], "sparse_layers": [...],
                       "num_layers", "num_kept", "ratio", "method", "seed" (method=random; else null),
                       "constraints": {"keep_first", "keep_last", "include", "exclude", "spread",
                                       "forced": {layer: why}},
                       "layers": [{"index", "retrieval", "commonsense", "retrieval_drop", "commonsense_drop",
                                   "score", "kept", "forced"}, ...],
                       "baseline": {"retrieval", "commonsense"} | null, "source": {...}, "cost": {...}}
    scores.png        scores per layer, kept layers marked
    metrics.json      (sweep mode) what was measured, in the format metrics=... reads back:
                      {"layers": {"0": {"retrieval": R_0, "commonsense": C_0, ...}, ...}, "baseline": {...}};
                      method=stepwise: {"method": "stepwise", "steps": [{"kept_before", "chosen", "start",
                      "candidates": {"j": {"retrieval", "commonsense", ...}}}, ...], "cost"} (its rows also carry
                      retrieval_gain / commonsense_gain: the gain when that layer's attention is restored)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from ..eval.report import format_table
from ..rundir import OutputDir
from ..tracking import log_wandb_table, wandb_run
from .config import SelectConfig, constraints_of, ignored_keys, read_metrics, validate
from .methods import Selection, drops, select_layers
from .plot import plot_scores
from .stepwise import run_stepwise
from .sweep import LayerMetrics, run_sweep

log = logging.getLogger(__name__)
FORMAT = "salatrain.layer_plan/1"
SCHEMA = SelectConfig
CONFIG_MODULE = "salatrain.config"  # the schema alone: conf/'s groups (model/, ...) must not capture `model=`

__all__ = ["SCHEMA", "check", "ignored_keys", "run", "select"]


def check(cfg: SelectConfig) -> None:
    validate(cfg)


def run(cfg: SelectConfig) -> dict:
    plan = select(cfg)
    print(table(plan))
    out = Path(cfg.output_dir)
    spread = " (spread: one per segment of the depth)" if plan["constraints"].get("spread") else ""
    print(f"\n{plan['method']}{spread}: sparse attention at layers {plan['sparse_layers']} ({plan['num_kept']} of "
          f"{plan['num_layers']}); wrote {out / 'layer_plan.json'} and {out / 'scores.png'} "
          f"({plan['cost'].get('seconds_total', 0)} s)")
    print(f"next: salatrain convert model=<dense dir> plan.file={out / 'layer_plan.json'} "
          "aligned=<align output> output_dir=<dir>")
    return plan


def gather(cfg: SelectConfig, mode: str, num_layers: int) -> LayerMetrics:
    if mode == "metrics":
        r, c, base = read_metrics(cfg.metrics)
        src = {"mode": "metrics", "metrics_file": str(Path(cfg.metrics).expanduser().resolve())}
        return LayerMetrics(r, c, base, src, {"tokens": 0, "seconds": 0.0})
    if mode == "sweep":
        return run_sweep(cfg)
    src = {"mode": "none", "model": cfg.model, "num_layers": num_layers}
    return LayerMetrics(None, None, None, src, {"tokens": 0, "seconds": 0.0})


def build_plan(cfg: SelectConfig, num_layers: int, metrics: LayerMetrics, sel: Selection) -> dict:
    r, c = metrics.retrieval, metrics.commonsense
    stepwise = metrics.gains is not None
    r_drop = drops(r) if r is not None and not stepwise else None
    c_drop = drops(c) if c is not None and not stepwise else None
    rows = []
    for i in range(num_layers):
        row = {
            "index": i,
            "retrieval": r[i] if r is not None else None,
            "commonsense": c[i] if c is not None else None,
            "retrieval_drop": r_drop[i] if r_drop is not None else None,
            "commonsense_drop": c_drop[i] if c_drop is not None else None,
            "score": sel.scores[i],
            "kept": i in sel.kept,
            "forced": sel.forced.get(i),
        }
        if stepwise:  # R and C when layer i's attention is restored, at the step it was chosen or the last one
            row["retrieval_gain"], row["commonsense_gain"] = metrics.gains[0][i], metrics.gains[1][i]
        rows.append(row)
    cons = constraints_of(cfg)
    return {
        "format": FORMAT,
        "mixer_types": sel.mixer_types(num_layers),
        "sparse_layers": sel.kept,
        "num_layers": num_layers,
        "num_kept": sel.num_kept,
        "ratio": cfg.ratio,
        "method": cfg.method,
        "seed": cfg.seed if cfg.method == "random" else None,  # only method=random draws from it
        "constraints": {**dataclasses.asdict(cons), "forced": {str(k): v for k, v in sel.forced.items()}},
        "layers": rows,
        "baseline": metrics.baseline,
        "source": metrics.source,
        "cost": metrics.cost,
    }


def select(cfg: SelectConfig) -> dict:
    """Run the selection described by ``cfg``; returns the layer plan (also written to output_dir)."""
    mode, num_layers, out = validate(cfg)
    with out:
        return _select(cfg, mode, num_layers, out)


def _select(cfg: SelectConfig, mode: str, num_layers: int, out: OutputDir) -> dict:
    t0 = time.time()
    if cfg.method == "stepwise":
        metrics, sel = run_stepwise(cfg, num_layers)
    else:
        metrics = gather(cfg, mode, num_layers)
        sel = select_layers(num_layers, cfg.method, cfg.ratio, constraints_of(cfg), metrics.retrieval,
                            metrics.commonsense, cfg.seed)
    plan = build_plan(cfg, num_layers, metrics, sel)
    plan["cost"] = {**plan["cost"], "seconds_total": round(time.time() - t0, 1)}
    with out.atomic() as tmp:
        (tmp / "layer_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        if metrics.raw is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics.raw, indent=2) + "\n")
        plot_scores(tmp / "scores.png", plan)
    run = wandb_run(cfg.logging, dataclasses.asdict(cfg), "select", cfg.output_dir)
    if run is not None:
        _log_wandb(run, plan, Path(cfg.output_dir) / "scores.png")
    return plan


def table(plan: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [[str(r["index"]), num(r["retrieval"], ".4f"), num(r["commonsense"], ".4f"), num(r["score"], ".3f"),
             ("sparse" + (f" ({r['forced']})" if r["forced"] else "")) if r["kept"] else "linear"]
            for r in plan["layers"]]
    return format_table(["layer", "R_i", "C_i", "score", "mixer"], rows)


def _log_wandb(run, plan: dict, png: Path) -> None:
    cols = ["index", "retrieval", "commonsense", "retrieval_drop", "commonsense_drop", "score", "kept", "forced"]
    log_wandb_table(run, "layers", cols, [[r[c] for c in cols] for r in plan["layers"]], images={"scores": png},
                    summary={"sparse_layers": plan["sparse_layers"], "method": plan["method"]})
