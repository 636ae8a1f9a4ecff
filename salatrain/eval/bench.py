"""`salatrain bench`: prefill time, decode speed and peak memory of one or more models against prompt length.

For every model and length: a synthetic prompt of ``length`` token ids goes through the model with its cache
(prefill: time to first token — the forward that builds the cache generation uses, plus the first greedy token),
then ``decode_tokens`` tokens are decoded one at a time with that cache. On CUDA the times come from CUDA events
after a synchronisation and the peak from ``torch.cuda.max_memory_allocated`` (weights included); on CPU from
the wall clock and the process's peak resident memory. A run that runs out of memory becomes a row saying OOM;
longer lengths of that model are then not run.

Dense checkpoints load with transformers' own class (what a user of the dense model gets); hybrid checkpoints
with salatrain's. Output: the table on screen, ``<output_dir>/bench.json``, ``<output_dir>/bench.png``, W&B when
enabled:

    {"format": "salatrain.bench/1",
     "device": {"type", "name", "dtype", "batch_size", "memory_measure", "available_bytes", "torch", "transformers"},
     "models": [{"name", "path", "kind", "class", "mixers", "num_params", "weights_bytes"}],
     "baseline": name of the first compare model or null,
     "results": [{"model", "length", "status": "ok" | "oom", "prefill_s", "prefill_tokens_per_s",
                  "decode_tokens_per_s", "decode_tokens", "peak_memory_bytes", "cache_bytes", "estimate_bytes",
                  "prefill_speedup", "decode_speedup", "note",
                  "oom" (OOM rows): "measured" | "estimated" (not run) | "skipped" (after a shorter length's OOM)}],
     "settings": {...the resolved config...}, "seconds": total}
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..hf_checkpoint import CheckpointDir
from ..rundir import OutputDir
from ..tracking import wandb_run
from .bench_config import BenchConfig
from .bench_device import PeakMemory, device_name, free_memory, is_oom
from .bench_measure import load_bench_model, measure
from .bench_memory import GIB, MemoryEstimate, ModelShape, available_bytes, estimate
from .bench_report import format_length, log_wandb, plot, speedups
from .loading import resolve_device, resolve_dtype
from .report import check_output_file, check_wandb, write_json_atomic

log = logging.getLogger(__name__)
FORMAT = "salatrain.bench/1"
_SUFFIX = {"": 1, "K": 1024, "M": 1024**2}


@dataclass
class ModelPlan:
    name: str
    ckpt: CheckpointDir
    kind: str  # "hybrid" | "transformers" | "dense-as-hybrid"
    estimates: dict[int, MemoryEstimate]


@dataclass
class Plan:
    models: list[ModelPlan]
    lengths: list[int]
    device: torch.device
    dtype: torch.dtype
    available: int
    available_what: str


# ----------------------------------------------------------------------------------------------------------------
# Validation (before any weights load)
# ----------------------------------------------------------------------------------------------------------------


def parse_length(value) -> int:
    """8192, "8192", "8K" or "1M" → a token count (K = 1024, M = 1024²); UserError otherwise."""
    if isinstance(value, bool):
        raise UserError(f"lengths: {value!r} is not a token count")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(-?\d+)\s*([kKmM]?)\s*", str(value))
        if not m:
            raise UserError(f"lengths: cannot read {value!r} as a token count (e.g. 8192, 8K, 1M)")
        n = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if n < 1:
        raise UserError(f"lengths must be positive token counts (got {value!r})")
    return n


def check_lengths(values) -> list[int]:
    if not values:
        raise UserError("lengths is empty; give at least one prompt length, e.g. lengths=[8K,32K]")
    lengths = [parse_length(v) for v in values]
    if len(set(lengths)) != len(lengths):
        raise UserError(f"lengths has duplicates ({list(values)})")
    return sorted(lengths)


def _check_numbers(cfg: BenchConfig) -> None:
    for key, low in (("decode_tokens", 1), ("batch_size", 1), ("warmup", 0), ("repeats", 1)):
        if getattr(cfg, key) < low:
            raise UserError(f"{key} must be >= {low} (got {getattr(cfg, key)})")
    if cfg.prefill_chunk is not None and cfg.prefill_chunk < 1:
        raise UserError(f"prefill_chunk must be >= 1 (got {cfg.prefill_chunk})")
    if cfg.memory_limit_gib is not None and cfg.memory_limit_gib <= 0:
        raise UserError(f"memory_limit_gib must be > 0 (got {cfg.memory_limit_gib})")


def model_kind(ckpt: CheckpointDir) -> str:
    """How a checkpoint loads: the hybrid class, transformers' own class, or (a salatrain family transformers does
    not ship, e.g. MiniCPM4) the hybrid class with every layer full_attention."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..models.families import family_for

    if ckpt.model_type == "sala_hybrid":
        return "hybrid"
    if ckpt.model_type in CONFIG_MAPPING:
        return "transformers"
    try:
        family_for(ckpt.model_type)
    except ValueError:
        raise UserError(f"{ckpt.path}: model_type {ckpt.model_type!r} is neither a salatrain hybrid nor a model "
                        "transformers ships") from None
    return "dense-as-hybrid"


def _names(cfg: BenchConfig, paths: list[str]) -> list[str]:
    names = list(cfg.names) or [Path(p).expanduser().resolve().name or "model" for p in paths]
    if not cfg.names and len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise UserError(f"names must give {len(paths)} distinct labels, one per model (got {list(cfg.names)})")
    return names


def validate(cfg: BenchConfig) -> Plan:
    """Every check before any weights load; refuses lengths whose memory estimate exceeds what is available."""
    if not cfg.model:
        raise UserError("missing model=<HF checkpoint dir> (hybrid or dense)")
    output_dir(cfg)
    _check_numbers(cfg)
    lengths = check_lengths(cfg.lengths)
    check_wandb(cfg.logging)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    paths = [cfg.model, *cfg.compare]
    names = _names(cfg, paths)
    if cfg.memory_limit_gib is not None:
        available, what = int(cfg.memory_limit_gib * GIB), "memory_limit_gib"
    else:
        available, what = available_bytes(device)
    elem = torch.empty((), dtype=dtype).element_size()
    models = []
    for name, path in zip(names, paths):
        ckpt = CheckpointDir(path)
        kind = model_kind(ckpt)
        try:
            shape = ModelShape.of(ckpt)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{ckpt.path}/config.json lacks what the memory estimate needs ({e})") from None
        est = {n: estimate(shape, n, cfg.batch_size, elem, cfg.decode_tokens, cfg.prefill_chunk) for n in lengths}
        models.append(ModelPlan(name, ckpt, kind, est))
    _check_fit(models, available, what, cfg.skip_unfit)
    return Plan(models, lengths, device, dtype, available, what)


def _check_fit(models: list[ModelPlan], available: int, what: str, skip_unfit: bool) -> None:
    unfit = [(m.name, n, e) for m in models for n, e in m.estimates.items() if e.total > available]
    if not unfit or skip_unfit:
        return
    name, n, e = unfit[0]
    more = f" (and {len(unfit) - 1} more model/length pairs)" if len(unfit) > 1 else ""
    raise UserError(f"{name} at {format_length(n)} tokens needs {e.describe()}, more than the {available / GIB:.1f} "
                    f"GiB of {what}{more}; drop those lengths, lower batch_size, set prefill_chunk, or pass "
                    "skip_unfit=true to report them as OOM without running them")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def _oom_row(name: str, length: int, oom: str, note: str, est: MemoryEstimate) -> dict:
    """``oom``: "measured" (the run ran out of memory), "estimated" (not run: the estimate exceeds the memory) or
    "skipped" (not run: a shorter length or the weights ran out of memory)."""
    return {"model": name, "length": length, "status": "oom", "oom": oom, "prefill_s": None,
            "prefill_tokens_per_s": None, "decode_tokens_per_s": None, "decode_tokens": None,
            "peak_memory_bytes": None, "cache_bytes": None, "estimate_bytes": est.total, "note": note}


def _mixers(model) -> dict[str, int]:
    mixers = getattr(model.config, "mixer_types", None)
    if mixers is None:
        layer_types = getattr(model.config, "layer_types", None)
        mixers = list(layer_types) if layer_types else ["full_attention"] * model.config.num_hidden_layers
    return {m: mixers.count(m) for m in dict.fromkeys(mixers)}


def bench_model(mp: ModelPlan, plan: Plan, cfg: BenchConfig, progress) -> tuple[dict, list[dict]]:
    """Load one model, run every length (shortest first); returns (model record, result rows). After an
    out-of-memory run the longer lengths are not run."""
    record = {"name": mp.name, "path": str(mp.ckpt.path), "kind": mp.kind}
    model, oom_at = None, None
    try:
        model = load_bench_model(mp.kind, mp.ckpt.path, plan.device, plan.dtype)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is turned into rows
        if not is_oom(e):
            raise
        oom_at = "loading the weights"
    if model is not None:
        record.update({"class": type(model).__name__, "mixers": _mixers(model),
                       "num_params": sum(p.numel() for p in model.parameters()),
                       "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())})
    rows = []
    for n in plan.lengths:
        row = _length_row(model, mp, n, plan, cfg, oom_at, progress())
        rows.append(row)
        if row.get("oom") == "measured":
            oom_at = f"{format_length(n)} tokens"
    del model
    free_memory(plan.device)
    return record, rows


def _length_row(model, mp: ModelPlan, n: int, plan: Plan, cfg: BenchConfig, oom_at: str | None, label: str) -> dict:
    est = mp.estimates[n]
    where = f"{label} {mp.name} @ {format_length(n)}"
    if oom_at is not None:
        log.info("%s: not run (out of memory at %s)", where, oom_at)
        return _oom_row(mp.name, n, "skipped", f"not run: out of memory at {oom_at}", est)
    if est.total > plan.available:
        log.info("%s: not run, the estimate (%s) exceeds the memory", where, est.describe())
        return _oom_row(mp.name, n, "estimated", f"not run: needs {est.describe()}, {plan.available / GIB:.1f} GiB of "
                        f"{plan.available_what}", est)
    log.info("%s tokens ...", where)
    row, error = _run_one(model, n, cfg, plan.device)
    if row is None:
        free_memory(plan.device)
        log.info("%s: OOM (%s)", where, error)
        return _oom_row(mp.name, n, "measured", f"out of memory: {error}", est)
    log.info("%s: prefill %.3f s (%.0f tok/s), decode %.1f tok/s, peak %.2f GiB", where, row["prefill_s"],
             row["prefill_tokens_per_s"], row["decode_tokens_per_s"], row["peak_memory_bytes"] / GIB)
    return {"model": mp.name, "length": n, **row, "estimate_bytes": est.total, "note": ""}


def _run_one(model, length: int, cfg: BenchConfig, device: torch.device) -> tuple[dict | None, str | None]:
    """(measurements, None), or (None, first line of the error) when the run ran out of memory. The exception
    (and the tensors its frames hold) is dropped before the caller frees the memory."""
    try:
        return measure(model, length, cfg, device), None
    except Exception as e:  # noqa: BLE001 - only out-of-memory is turned into a row
        if not is_oom(e):
            raise
        return None, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def output_dir(cfg: BenchConfig) -> OutputDir:
    """bench adds bench.json and bench.png to its output_dir (existing ones only with overwrite=true)."""
    check_output_file(cfg.output_dir, "bench.json", cfg.overwrite)
    out = OutputDir(cfg.output_dir, "bench", overwrite=cfg.overwrite, reuse=True)
    out.check({"model": cfg.model, "compare": list(cfg.compare)})
    return out


def run_bench(cfg: BenchConfig) -> dict:
    plan = validate(cfg)
    with output_dir(cfg) as out:
        return _run_bench(cfg, plan, out)


def _run_bench(cfg: BenchConfig, plan: Plan, out: OutputDir) -> dict:
    t0 = time.time()
    out_dir = out.path
    import transformers

    report = {"format": FORMAT,
              "device": {"type": plan.device.type, "name": device_name(plan.device), "dtype": str(plan.dtype)[6:],
                         "batch_size": cfg.batch_size, "memory_measure": PeakMemory(plan.device).what,
                         "available_bytes": plan.available, "available_measure": plan.available_what,
                         "torch": torch.__version__, "transformers": transformers.__version__},
              "models": [], "baseline": plan.models[1].name if len(plan.models) > 1 else None, "results": [],
              "settings": dataclasses.asdict(cfg)}
    log.info("bench on %s (%s, %s): %d model(s) x %d length(s)", report["device"]["name"], plan.device,
             report["device"]["dtype"], len(plan.models), len(plan.lengths))
    total, done = len(plan.models) * len(plan.lengths), [0]

    def progress() -> str:
        done[0] += 1
        return f"[bench {done[0]}/{total}]"

    for mp in plan.models:
        record, rows = bench_model(mp, plan, cfg, progress)
        report["models"].append(record)
        report["results"].extend(rows)
    speedups(report)
    report["seconds"] = round(time.time() - t0, 1)
    out.create()
    png = plot(out_dir / "bench.png", report)
    write_json_atomic(out_dir / "bench.json", report)
    run = wandb_run(cfg.logging, dataclasses.asdict(cfg), "bench", out_dir)
    if run is not None:
        log_wandb(run, report, png)
    return report
