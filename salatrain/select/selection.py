"""`salatrain select`: per-layer metrics (a sweep, a metrics file, or none) → layer_plan.json + scores.png.

Output folder (written all at once, so a failure leaves nothing):
    layer_plan.json   {"format": "salatrain.layer_plan/1", "mixer_types": [...], "sparse_layers": [...],
                       "num_layers", "num_kept", "ratio", "method", "seed",
                       "constraints": {"keep_first", "keep_last", "include", "exclude", "forced": {layer: why}},
                       "layers": [{"index", "retrieval", "commonsense", "retrieval_drop", "commonsense_drop",
                                   "score", "kept", "forced"}, ...],
                       "baseline": {"retrieval", "commonsense"} | null, "source": {...}, "cost": {...}}
    scores.png        scores per layer, kept layers marked
    metrics.json      (sweep mode) what was measured, in the format metrics=... reads back:
                      {"layers": {"0": {"retrieval": R_0, "commonsense": C_0, ...}, ...}, "baseline": {...}}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

from ..errors import UserError
from ..eval.report import check_wandb, format_table
from ..rundir import OutputDir
from ..tracking import log_wandb_table, wandb_run
from .config import SelectConfig
from .methods import METHODS, Constraints, Selection, check_constraints, drops, select_layers
from .plot import plot_scores

log = logging.getLogger(__name__)
FORMAT = "salatrain.layer_plan/1"


@dataclasses.dataclass
class LayerMetrics:
    retrieval: list[float] | None
    commonsense: list[float] | None
    baseline: dict | None
    source: dict
    cost: dict
    raw: dict | None = None  # metrics.json to write (sweep mode)


def constraints_of(cfg: SelectConfig) -> Constraints:
    return Constraints(cfg.keep_first, cfg.keep_last, [int(i) for i in cfg.include], [int(i) for i in cfg.exclude])


def mode_of(cfg: SelectConfig) -> str:
    if cfg.metrics and (cfg.aligned or cfg.model):
        raise UserError("pass either metrics=<metrics.json> or model=<dense dir> aligned=<align output>, not both")
    if cfg.metrics:
        return "metrics"
    if cfg.aligned:
        if not cfg.model:
            raise UserError("aligned=... needs model=<the dense base model dir> for the sweep")
        return "sweep"
    if cfg.method in ("halo", "retrieval"):
        raise UserError(f"method={cfg.method} needs per-layer metrics: pass model=<dense dir> aligned=<align output> "
                        "(sweep) or metrics=<metrics.json>")
    return "none"


def output_dir(cfg: SelectConfig) -> OutputDir:
    out = OutputDir(cfg.output_dir, "select", overwrite=cfg.overwrite)
    out.check({"model": cfg.model, "aligned": cfg.aligned, "metrics": cfg.metrics,
               "sweep.text.files": list(cfg.sweep.text.files)})
    return out


def ignored_keys(cfg: SelectConfig) -> dict[str, str]:
    """Keys the chosen mode does not use (setting one is an error); none while the method itself is wrong."""
    if cfg.method not in METHODS:
        return {}
    out = {}
    if cfg.metrics:
        out["num_layers"] = f"with metrics={cfg.metrics} (the metrics file gives the number of layers)"
    elif cfg.model:
        out["num_layers"] = f"with model={cfg.model} (the model gives the number of layers)"
    if not cfg.aligned:
        out["sweep"] = "without aligned=<align output> (no sweep runs)"
    if cfg.method != "random":
        out["seed"] = "unless method=random"
    if cfg.method == "uniform":
        for key in ("keep_first", "keep_last"):
            out[key] = "with method=uniform (it always keeps the first and the last layer)"
    return out


def validate(cfg: SelectConfig) -> tuple[str, int]:
    """Every check that needs no model weights; returns (mode, number of layers)."""
    output_dir(cfg)
    if cfg.method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)} (got {cfg.method!r})")
    mode = mode_of(cfg)
    if mode == "metrics":
        num_layers = len(read_metrics(cfg.metrics)[0])
    elif cfg.model:
        from ..eval.loading import check_model_dir

        num_layers = int(check_model_dir(cfg.model).config.get("num_hidden_layers", 0))
    elif cfg.num_layers:
        num_layers = int(cfg.num_layers)
    else:
        raise UserError(f"method={cfg.method} needs the layer count: pass model=<dense dir> or num_layers=<L>")
    check_settings(cfg, num_layers)
    if mode == "sweep":
        from .run_sweep import check_sweep

        check_sweep(cfg)
    return mode, num_layers


def check_settings(cfg: SelectConfig, num_layers: int) -> None:
    """Checks that need only the layer count: method, ratio, constraints, sweep settings, logging."""
    if num_layers < 1:
        raise UserError(f"cannot select from {num_layers} layers")
    check_constraints(num_layers, cfg.method, cfg.ratio, constraints_of(cfg))
    check_wandb(cfg.logging)
    if cfg.aligned:
        from .run_sweep import check_sweep_settings

        check_sweep_settings(cfg.sweep)


def read_metrics(path: str) -> tuple[list[float], list[float], dict | None]:
    """(retrieval per layer, commonsense per layer, baseline or None) from a metrics file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"metrics file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"metrics file {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise UserError(f'metrics file {p} must hold {{"layers": {{"0": {{"retrieval": .., "commonsense": ..}}, ...}}}}')
    try:
        layers = {int(k): v for k, v in layers.items()}
    except ValueError:
        raise UserError(f"metrics file {p}: layer keys must be integers, got {sorted(layers)[:5]}") from None
    idx = sorted(layers)
    if idx != list(range(len(idx))):
        missing = sorted(set(range(max(idx) + 1)) - set(idx))
        raise UserError(f"metrics file {p}: layers must be 0..{len(idx) - 1} without gaps (missing {missing[:5]})")
    r, c = [], []
    for i in idx:
        row = layers[i]
        for key, out in (("retrieval", r), ("commonsense", c)):
            v = row.get(key) if isinstance(row, dict) else None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"metrics file {p}: layer {i} needs a finite number for {key!r} (got {v!r})")
            out.append(float(v))
    return r, c, data.get("baseline")


def gather(cfg: SelectConfig, mode: str, num_layers: int) -> LayerMetrics:
    if mode == "metrics":
        r, c, base = read_metrics(cfg.metrics)
        src = {"mode": "metrics", "metrics_file": str(Path(cfg.metrics).expanduser().resolve())}
        return LayerMetrics(r, c, base, src, {"tokens": 0, "seconds": 0.0})
    if mode == "sweep":
        from .run_sweep import run_sweep

        return run_sweep(cfg)
    src = {"mode": "none", "model": cfg.model, "num_layers": num_layers}
    return LayerMetrics(None, None, None, src, {"tokens": 0, "seconds": 0.0})


def build_plan(cfg: SelectConfig, num_layers: int, metrics: LayerMetrics, sel: Selection) -> dict:
    r, c = metrics.retrieval, metrics.commonsense
    r_drop = drops(r) if r is not None else None
    c_drop = drops(c) if c is not None else None
    rows = []
    for i in range(num_layers):
        rows.append({
            "index": i,
            "retrieval": r[i] if r is not None else None,
            "commonsense": c[i] if c is not None else None,
            "retrieval_drop": r_drop[i] if r_drop is not None else None,
            "commonsense_drop": c_drop[i] if c_drop is not None else None,
            "score": sel.scores[i],
            "kept": i in sel.kept,
            "forced": sel.forced.get(i),
        })
    cons = constraints_of(cfg)
    return {
        "format": FORMAT,
        "mixer_types": sel.mixer_types(num_layers),
        "sparse_layers": sel.kept,
        "num_layers": num_layers,
        "num_kept": sel.num_kept,
        "ratio": cfg.ratio,
        "method": cfg.method,
        "seed": cfg.seed,
        "constraints": {**dataclasses.asdict(cons), "forced": {str(k): v for k, v in sel.forced.items()}},
        "layers": rows,
        "baseline": metrics.baseline,
        "source": metrics.source,
        "cost": metrics.cost,
    }


def select(cfg: SelectConfig) -> dict:
    """Run the selection described by ``cfg``; returns the layer plan (also written to output_dir)."""
    mode, num_layers = validate(cfg)
    with output_dir(cfg) as out:
        return _select(cfg, mode, num_layers, out)


def _select(cfg: SelectConfig, mode: str, num_layers: int, out: OutputDir) -> dict:
    t0 = time.time()
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
