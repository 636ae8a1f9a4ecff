"""Sweep mode of `salatrain select`: load the dense base and the align output, build the probe batch and the
held-out text, run the sweep (built-in metrics and/or lm-eval tasks), return per-layer metrics."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..eval import lm_eval_adapter
from ..eval.evaluate import check_probe_settings
from ..eval.loading import check_model_dir, resolve_device, resolve_dtype
from ..eval.probes import make_samples
from ..eval.text import BUILTIN, builtin_documents, read_documents, token_windows
from ..hf_checkpoint import CheckpointDir
from ..memory import ModelShape, check_sweep_memory
from .config import SelectConfig
from .sweep import SweepResult, lm_eval_sweep, sweep

log = logging.getLogger(__name__)
RETRIEVAL_METRICS = ("answer_logprob", "exact_match")


def check_sweep(cfg: SelectConfig) -> None:
    """The sweep's inputs: a dense base of a supported family, an aligned dir, text files; then its settings."""
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
    check_sweep_settings(cfg.sweep)
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


def run_sweep(cfg: SelectConfig):
    from ..hf_checkpoint import load_tokenizer
    from ..models.loading import dense_config, load_dense_as_hybrid
    from .aligned import AlignedLayers
    from .selection import LayerMetrics

    s = cfg.sweep
    base = CheckpointDir(cfg.model)
    aligned = AlignedLayers(cfg.aligned, base, dense_config(base))
    tok = load_tokenizer(base.path)
    samples, windows = _probe_batch(tok, cfg), _heldout(tok, cfg)
    device = resolve_device(s.device)
    model = load_dense_as_hybrid(base, dtype=resolve_dtype(s.dtype, device)).to(device)
    builtin = None
    if not (s.retrieval_tasks and s.commonsense_tasks):
        builtin = sweep(model, aligned, samples, windows, s.retrieval_metric, device)
    result = builtin
    if s.retrieval_tasks or s.commonsense_tasks:
        result = lm_eval_sweep(model, tok, aligned, list(s.retrieval_tasks), list(s.commonsense_tasks), builtin,
                               limit=s.lm_eval_limit, num_fewshot=s.lm_eval_num_fewshot)
    source = {
        "mode": "sweep", "model": str(base.path), "model_fingerprint": base.fingerprint(),
        "aligned": str(aligned.ckpt.path), "align_report": aligned.report or None,
        "retrieval": (f"lm-eval {list(s.retrieval_tasks)} (mean headline metric)" if s.retrieval_tasks else
                      f"probes {list(s.probes.tasks)} at {list(s.probes.lengths)} tokens, {s.probes.num_samples} "
                      f"samples each, seed {s.probes.seed}: mean {s.retrieval_metric}"),
        "commonsense": (f"lm-eval {list(s.commonsense_tasks)} (mean headline metric)" if s.commonsense_tasks else
                        f"-(LM loss) on {len(windows)} held-out windows of {s.text.seq_len} tokens "
                        f"({', '.join(s.text.files) or 'built-in ' + s.text.builtin})"),
    }
    return LayerMetrics([m.retrieval for m in result.layers], [m.commonsense for m in result.layers],
                        {"retrieval": result.baseline.retrieval, "commonsense": result.baseline.commonsense},
                        source, result.cost, raw=_raw(result))


def _probe_batch(tok, cfg: SelectConfig) -> list:
    p = cfg.sweep.probes
    if cfg.sweep.retrieval_tasks:
        return []
    try:
        return [x for task in p.tasks for n in p.lengths for x in make_samples(tok, task, int(n), p.num_samples, p.seed)]
    except ValueError as e:
        raise UserError(str(e)) from None


def _heldout(tok, cfg: SelectConfig) -> list[list[int]]:
    t = cfg.sweep.text
    if cfg.sweep.commonsense_tasks:
        return []
    docs = read_documents(list(t.files), t.text_field) if t.files else [d for _, d in builtin_documents(t.builtin)]
    return token_windows(tok, docs, t.seq_len, t.max_tokens)


def _raw(result: SweepResult) -> dict:
    layers = {str(i): {"retrieval": m.retrieval, "commonsense": m.commonsense, **m.detail}
              for i, m in enumerate(result.layers)}
    base = result.baseline
    return {"layers": layers, "baseline": {"retrieval": base.retrieval, "commonsense": base.commonsense,
                                           **base.detail}, "cost": result.cost}
