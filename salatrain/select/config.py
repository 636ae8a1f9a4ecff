"""Config schema of `salatrain select` and every check of it that needs no model weights (run once, before
anything is loaded or written): the mode (metrics file, sweep, none), the layer count, the method and its
constraints, the sweep's inputs and settings, W&B, and the output folder against the inputs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config.ranges import at_least, between, random_seed
from ..config.schema import LoggingSettings
from ..errors import UserError
from ..eval import lm_eval_adapter
from ..eval.config import ProbeSettings
from ..eval.evaluate import check_probe_settings
from ..eval.loading import check_model_dir, resolve_device, resolve_dtype
from ..eval.report import check_wandb
from ..eval.text import BUILTIN
from ..hf_checkpoint import CheckpointDir
from ..memory import ModelShape, check_sweep_memory
from ..rundir import OutputDir
from .methods import METHODS, Constraints, check_constraints

RETRIEVAL_METRICS = ("answer_logprob", "exact_match")


@dataclass
class HeldoutText:
    """Held-out text for C_i = −(LM loss): ``files`` or the built-in corpus ``builtin`` (pydoc | stdlib)."""

    files: list[str] = field(default_factory=list)
    builtin: str = "pydoc"
    text_field: str = "text"
    seq_len: int = at_least(2, 1024)
    max_tokens: int = at_least(2, 4096)


@dataclass
class SweepSettings:
    """How R_i and C_i are measured when sweeping (aligned=...)."""

    # seed 1: the sweep's probe samples are not the ones `salatrain eval` scores by default (probes.seed=0)
    probes: ProbeSettings = field(default_factory=lambda: ProbeSettings(lengths=[1024], num_samples=4, seed=1))
    text: HeldoutText = field(default_factory=HeldoutText)
    retrieval_metric: str = "answer_logprob"  # answer_logprob (continuous) | exact_match
    retrieval_tasks: list[str] = field(default_factory=list)  # lm-eval tasks instead of the probes, e.g. ruler_qa_squad
    commonsense_tasks: list[str] = field(default_factory=list)  # lm-eval tasks instead of −loss, e.g. hellaswag
    lm_eval_limit: Optional[int] = at_least(1, None)
    lm_eval_num_fewshot: Optional[int] = at_least(0, None)
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class SelectConfig:
    """salatrain select model=<dense dir> aligned=<align output> output_dir=<dir> [method=halo ratio=0.25 ...]
    or       salatrain select metrics=<metrics.json> output_dir=<dir> [method=...]"""

    model: Optional[str] = None  # the dense base (sweep mode; also gives the layer count for uniform/random)
    aligned: Optional[str] = None  # align-stage output (sweep mode)
    metrics: Optional[str] = None  # {"layers": {"0": {"retrieval": .., "commonsense": ..}, ...}} (metrics mode)
    num_layers: Optional[int] = at_least(1, None)  # uniform/random with neither model nor metrics
    output_dir: Optional[str] = None
    method: str = "halo"  # halo | retrieval | uniform | random
    ratio: float = between(0.0, 1.0, 0.25, lo_open=True)
    keep_first: bool = True
    keep_last: bool = True
    include: list[int] = at_least(0, [])
    exclude: list[int] = at_least(0, [])
    spread: bool = False  # halo | retrieval | random: the best-scored layer of each n-th of the depth
    seed: int = random_seed()  # method=random
    sweep: SweepSettings = field(default_factory=SweepSettings)
    overwrite: bool = False
    logging: LoggingSettings = field(default_factory=LoggingSettings)


def constraints_of(cfg: SelectConfig) -> Constraints:
    return Constraints(cfg.keep_first, cfg.keep_last, [int(i) for i in cfg.include], [int(i) for i in cfg.exclude],
                       bool(cfg.spread))


def mode_of(cfg: SelectConfig) -> str:
    if cfg.metrics and (cfg.aligned or cfg.model):
        raise UserError("pass either metrics=<metrics.json> or model=<dense dir> aligned=<align output>, not both")
    if cfg.metrics:
        return "metrics"
    if cfg.aligned:
        if not cfg.model:
            raise UserError("aligned=... needs model=<the dense base model dir> for the sweep")
        return "sweep"
    if cfg.method == "stepwise":
        raise UserError("method=stepwise measures each layer given the layers kept before it: pass "
                        "model=<dense dir> aligned=<align output>")
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


def validate(cfg: SelectConfig) -> tuple[str, int, OutputDir]:
    """Every check that needs no model weights, each once; returns (mode, number of layers, output dir)."""
    out = output_dir(cfg)
    if cfg.method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)} (got {cfg.method!r})")
    mode = mode_of(cfg)
    if cfg.method == "stepwise":
        if mode != "sweep":
            raise UserError("method=stepwise measures each layer given the layers kept before it, so it sweeps: "
                            "pass model=<dense dir> aligned=<align output> (a metrics file holds one-at-a-time "
                            "measurements)")
        if cfg.sweep.retrieval_tasks or cfg.sweep.commonsense_tasks:
            raise UserError("method=stepwise scores with the built-in probes and held-out text; drop "
                            "sweep.retrieval_tasks / sweep.commonsense_tasks (lm-eval would run once per candidate "
                            "and step)")
    if mode == "metrics":
        num_layers = len(read_metrics(cfg.metrics)[0])
    elif cfg.model:
        num_layers = int(check_model_dir(cfg.model).config.get("num_hidden_layers", 0))
    elif cfg.num_layers:
        num_layers = int(cfg.num_layers)
    else:
        raise UserError(f"method={cfg.method} needs the layer count: pass model=<dense dir> or num_layers=<L>")
    check_settings(cfg, num_layers)
    if mode == "sweep":
        check_sweep_inputs(cfg)
    return mode, num_layers, out


def check_settings(cfg: SelectConfig, num_layers: int) -> None:
    """Checks that need only the layer count: method, ratio, constraints, sweep settings, logging."""
    if num_layers < 1:
        raise UserError(f"cannot select from {num_layers} layers")
    check_constraints(num_layers, cfg.method, cfg.ratio, constraints_of(cfg))
    check_wandb(cfg.logging)
    if cfg.aligned:
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


def check_sweep_inputs(cfg: SelectConfig) -> None:
    """The sweep's inputs (its settings are checked by check_settings): a dense base of a supported family, an
    aligned dir, text files, and the memory the sweep needs."""
    from ..models.families import family_for

    base = check_model_dir(cfg.model)
    if base.model_type == "sala_hybrid":
        raise UserError(f"model={base.path} is a hybrid checkpoint; the sweep needs the dense base model")
    try:
        family_for(base.model_type)
    except ValueError as e:
        raise UserError(f"{base.path}: {e}") from None
    CheckpointDir(cfg.aligned, what="aligned")
    for f in cfg.sweep.text.files if not cfg.sweep.commonsense_tasks else []:
        if not Path(f).expanduser().is_file():
            raise UserError(f"text file {f} does not exist")
    s = cfg.sweep
    if not (s.retrieval_tasks and s.commonsense_tasks):
        p, device = s.probes, resolve_device(s.device)
        lengths = [] if s.retrieval_tasks else [int(n) for n in p.lengths for _ in range(p.num_samples * len(p.tasks))]
        text = 0 if s.commonsense_tasks else s.text.max_tokens
        check_sweep_memory(ModelShape.of(base), lengths, s.text.seq_len if text else 0, text, device,
                           resolve_dtype(s.dtype, device))


def check_sweep_settings(s) -> None:
    """Checks of the sweep settings that need no files."""
    if s.retrieval_metric not in RETRIEVAL_METRICS:
        raise UserError(f"sweep.retrieval_metric must be one of {', '.join(RETRIEVAL_METRICS)} "
                        f"(got {s.retrieval_metric!r})")
    if not s.retrieval_tasks:
        if not s.probes.tasks:
            raise UserError("sweep.probes.tasks is empty and no sweep.retrieval_tasks are given")
        check_probe_settings(s.probes)
    if not s.commonsense_tasks:
        t = s.text
        if not t.files and t.builtin not in BUILTIN:
            raise UserError(f"sweep.text.builtin must be one of {', '.join(BUILTIN)} when no sweep.text.files are "
                            f"given (got {t.builtin!r})")
        if t.seq_len < 2 or t.max_tokens < t.seq_len:
            raise UserError("sweep.text needs seq_len >= 2 and max_tokens >= seq_len")
    lm_eval_adapter.require([*s.retrieval_tasks, *s.commonsense_tasks])
    resolve_dtype(s.dtype, resolve_device(s.device))
