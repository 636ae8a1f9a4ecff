"""`salatrain eval`: perplexity, synthetic probes and optional lm-eval tasks for one or more models.

Every model is scored on the same samples (probes are generated once per tokenizer from the seed) and the
results land in ``<output_dir>/eval.json``:

    {"format": "salatrain.eval/1",
     "models":  [{"name", "path", "kind", "mixers", "seconds"}, ...],
     "results": {name: {"perplexity": {seq_len: {loss, perplexity, tokens, windows, seq_len}},
                        "probes": {task: {length: {exact_match, answer_logprob, num_samples, mean_tokens}}},
                        "lm_eval": {task: {metric: value, "primary": value}}}},
     "chance": {"exact_match": 0.0, "answer_logprob": -log V},
     "settings": {...the resolved config...}, "seconds": total}
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

from ..errors import UserError
from . import lm_eval_adapter
from .config import EvalConfig
from .loading import check_model_dir, load_model, resolve_device, resolve_dtype
from .probes import TASKS, make_samples
from ..memory import ModelShape, check_eval_memory
from ..rundir import OutputDir
from ..tracking import log_wandb_table, wandb_run
from .report import check_output_file, check_wandb, format_table, write_json_atomic
from .scoring import chance, perplexity, score_sample, summarize
from .text import BUILTIN, builtin_documents, read_documents, token_windows

log = logging.getLogger(__name__)
FORMAT = "salatrain.eval/1"


def output_dir(cfg: EvalConfig) -> OutputDir:
    """eval adds eval.json to its output_dir (an existing eval.json only with overwrite=true)."""
    check_output_file(cfg.output_dir, "eval.json", cfg.overwrite)
    out = OutputDir(cfg.output_dir, "eval", overwrite=cfg.overwrite, reuse=True)
    out.check({"model": cfg.model, "compare": list(cfg.compare), "perplexity.files": list(cfg.perplexity.files)})
    return out


def validate(cfg: EvalConfig) -> list[tuple[str, str]]:
    """Check every input before any work; returns [(column name, model dir)]."""
    if not cfg.model:
        raise UserError("missing model=<HF checkpoint dir> (hybrid or dense)")
    output_dir(cfg)
    paths = [cfg.model, *cfg.compare]
    ckpts = [check_model_dir(p) for p in paths]
    names = check_settings(cfg)
    for f in cfg.perplexity.files:
        if not Path(f).expanduser().is_file():
            raise UserError(f"text file {f} does not exist")
    device = resolve_device(cfg.device)
    text = cfg.perplexity
    scored_text = bool(text.files) or text.builtin != "none"
    check_eval_memory([ModelShape.of(c, salatrain=_salatrain_class(c)) for c in ckpts],
                      list(cfg.probes.lengths) if cfg.probes.tasks else [],
                      cfg.probes.num_samples * len(cfg.probes.tasks),
                      list(text.seq_lens) if scored_text else [], text.max_tokens, cfg.chunk_tokens, device,
                      resolve_dtype(cfg.dtype, device))
    return list(zip(names, paths))


def _salatrain_class(ckpt) -> bool:
    """Loaded as salatrain's hybrid class (its LM head runs in chunks), or through transformers."""
    from ..models.families import family_for

    if ckpt.model_type == "sala_hybrid":
        return True
    try:
        family_for(ckpt.model_type)
        return True
    except ValueError:
        return False


def ignored_keys(cfg: EvalConfig) -> dict[str, str]:
    """Keys the chosen settings do not use (setting one is an error)."""
    out = {}
    if not cfg.lm_eval.tasks:
        for key in ("limit", "num_fewshot", "batch_size"):
            out[f"lm_eval.{key}"] = "without lm_eval.tasks"
    if not cfg.probes.tasks:
        for key in ("lengths", "num_samples", "seed"):
            out[f"probes.{key}"] = "with probes.tasks=[] (no probes run)"
    text = cfg.perplexity
    if not text.files and text.builtin == "none":
        for key in ("seq_lens", "max_tokens", "text_field"):
            out[f"perplexity.{key}"] = "with perplexity.builtin=none and no perplexity.files (no perplexity)"
    elif text.files:
        out["perplexity.builtin"] = "when perplexity.files are given"
    if text.files and not any(str(f).endswith(".jsonl") for f in text.files):
        out["perplexity.text_field"] = "without .jsonl perplexity.files (other files are one document each)"
    return out


def check_settings(cfg: EvalConfig) -> list[str]:
    """Checks that need no files; returns the column names."""
    paths = [cfg.model, *cfg.compare]
    names = list(cfg.names) or _default_names(paths)
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise UserError(f"names must give {len(paths)} distinct labels, one per model (got {names})")
    check_probe_settings(cfg.probes)
    text = cfg.perplexity
    if not text.files and text.builtin not in (*BUILTIN, "none"):
        raise UserError(f"perplexity.builtin must be one of {', '.join(BUILTIN)} or none (got {text.builtin!r})")
    if any(s < 2 for s in text.seq_lens) or text.max_tokens < 2:
        raise UserError("perplexity.seq_lens and perplexity.max_tokens must be >= 2")
    lm_eval_adapter.require(list(cfg.lm_eval.tasks))
    measures = [(bool(cfg.probes.tasks) and bool(cfg.probes.lengths)),
                bool(text.seq_lens) and (bool(text.files) or text.builtin != "none"), bool(cfg.lm_eval.tasks)]
    if not any(measures):
        raise UserError("nothing to measure: probes.tasks / probes.lengths, perplexity.seq_lens (with text) and "
                        "lm_eval.tasks are all empty; give at least one")
    check_wandb(cfg.logging)
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    if cfg.chunk_tokens is not None and cfg.chunk_tokens < 1:
        raise UserError(f"chunk_tokens must be >= 1 (got {cfg.chunk_tokens})")
    return names


def check_probe_settings(p) -> None:
    bad = [t for t in p.tasks if t not in TASKS]
    if bad:
        raise UserError(f"unknown probe task(s) {bad}; choose from {list(TASKS)}")
    if any(n < 32 for n in p.lengths):
        raise UserError(f"probe lengths must be >= 32 tokens (got {list(p.lengths)})")
    if p.tasks and p.num_samples < 1:
        raise UserError(f"probes.num_samples must be >= 1 (got {p.num_samples})")


def _default_names(paths: list[str]) -> list[str]:
    names = [Path(p).expanduser().resolve().name or "model" for p in paths]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def evaluate(cfg: EvalConfig) -> dict:
    models = validate(cfg)
    with output_dir(cfg) as out:
        return _evaluate(cfg, models, out)


def _evaluate(cfg: EvalConfig, models: list[tuple[str, str]], out: OutputDir) -> dict:
    t0 = time.time()
    out_dir = out.path
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    inputs = _inputs_per_model(cfg, [p for _, p in models])  # probes and text before any weights load
    report = {"format": FORMAT, "models": [], "results": {}, "chance": None, "settings": dataclasses.asdict(cfg)}
    for name, path in models:
        tm = time.time()
        loaded = load_model(path, device, dtype)
        samples, windows = inputs[path]
        log.info("eval %s (%s, %s): %d probe samples, %d text windows", name, loaded.kind,
                 _mixer_text(loaded.mixer_counts), len(samples), sum(len(w) for w in windows.values()))
        report["results"][name] = _evaluate_model(loaded, samples, windows, cfg, device, name)
        report["chance"] = report["chance"] or chance(loaded.model.config.vocab_size)
        report["models"].append({"name": name, "path": loaded.path, "kind": loaded.kind,
                                 "mixers": loaded.mixer_counts, "seconds": round(time.time() - tm, 1)})
        del loaded
    report["seconds"] = round(time.time() - t0, 1)
    out.create()
    write_json_atomic(out_dir / "eval.json", report)
    run = wandb_run(cfg.logging, dataclasses.asdict(cfg), "eval", out_dir)
    if run is not None:
        _log_wandb(run, report)
    return report


def _evaluate_model(loaded, samples, windows, cfg: EvalConfig, device, name: str) -> dict:
    model = loaded.model
    res: dict = {"perplexity": {}, "probes": {}, "lm_eval": {}}
    for seq_len, ws in windows.items():
        t = time.time()
        res["perplexity"][str(seq_len)] = perplexity(model, ws, device, cfg.chunk_tokens)
        log.info("  %s perplexity@%d: %.3f (%d tokens, %.1f s)", name, seq_len,
                 res["perplexity"][str(seq_len)]["perplexity"], res["perplexity"][str(seq_len)]["tokens"],
                 time.time() - t)
    scores = []
    for task, length, group in _grouped(samples):
        t = time.time()
        scores.extend(score_sample(model, s, device, cfg.chunk_tokens) for s in group)
        done = summarize([s for s in scores if s.task == task and s.length == length])[task][str(length)]
        log.info("  %s %s@%d: exact %.2f, answer log-prob %.3f (%.1f s)", name, task, length, done["exact_match"],
                 done["answer_logprob"], time.time() - t)
    res["probes"] = summarize(scores)
    if cfg.lm_eval.tasks:
        lm = cfg.lm_eval
        res["lm_eval"] = lm_eval_adapter.run_tasks(model, loaded.tokenizer, list(lm.tasks), limit=lm.limit,
                                                   num_fewshot=lm.num_fewshot, batch_size=lm.batch_size)
    return res


def _grouped(samples):
    keys = list(dict.fromkeys((s.task, s.length) for s in samples))
    for task, length in keys:
        yield task, length, [s for s in samples if s.task == task and s.length == length]


def _inputs_per_model(cfg: EvalConfig, paths: list[str]) -> dict[str, tuple]:
    """{model dir: (probe samples, {seq_len: text windows})}; models with the same tokenizer share them."""
    from ..hf_checkpoint import load_tokenizer

    docs = _documents(cfg.perplexity)
    by_tokenizer: dict[str, tuple] = {}
    out = {}
    for path in paths:
        tok = load_tokenizer(path)
        key = tokenizer_fingerprint(tok)
        if key not in by_tokenizer:
            by_tokenizer[key] = (_samples(tok, cfg.probes), _windows(tok, docs, cfg.perplexity))
        out[path] = by_tokenizer[key]
    return out


def _documents(text) -> list[str] | None:
    if text.files:
        return read_documents(list(text.files), text.text_field)
    if text.builtin == "none":
        return None
    return [d for _, d in builtin_documents(text.builtin)]


def _samples(tokenizer, probes) -> list:
    out = []
    for task in probes.tasks:
        for length in probes.lengths:
            try:
                out.extend(make_samples(tokenizer, task, int(length), probes.num_samples, probes.seed))
            except ValueError as e:
                raise UserError(str(e)) from None
    return out


def _windows(tokenizer, docs, text) -> dict[int, list[list[int]]]:
    if docs is None:
        return {}
    return {int(s): token_windows(tokenizer, docs, int(s), text.max_tokens) for s in text.seq_lens}


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr((type(tokenizer).__name__, vocab, tokenizer.bos_token_id,
                                tokenizer.eos_token_id)).encode()).hexdigest()[:16]


def _mixer_text(counts: dict[str, int]) -> str:
    short = {"full_attention": "full", "linear_attention": "linear", "sparse_attention": "sparse"}
    return " + ".join(f"{n} {short.get(m, m)}" for m, n in counts.items())


def table(report: dict) -> str:
    """Rows: metrics; columns: models."""
    names = [m["name"] for m in report["models"]]
    res = report["results"]
    rows = []
    for seq in res[names[0]]["perplexity"]:
        rows.append([f"perplexity @{seq}"] + [f"{res[n]['perplexity'][seq]['perplexity']:.3f}" for n in names])
    for task, by_len in res[names[0]]["probes"].items():
        for length in by_len:
            rows.append([f"{task} @{length} exact"] + [f"{res[n]['probes'][task][length]['exact_match']:.2f}"
                                                        for n in names])
            rows.append([f"{task} @{length} log-prob"] + [f"{res[n]['probes'][task][length]['answer_logprob']:.3f}"
                                                           for n in names])
    for task in res[names[0]]["lm_eval"]:
        rows.append([f"lm-eval {task}"] + [f"{res[n]['lm_eval'].get(task, {}).get('primary', float('nan')):.4f}"
                                           for n in names])
    mixers = ["mixers"] + [_mixer_text(m["mixers"]) for m in report["models"]]
    return format_table(["metric"] + names, [mixers] + rows)


def _log_wandb(run, report: dict) -> None:
    names = [m["name"] for m in report["models"]]
    rows = []
    for n in names:
        r = report["results"][n]
        for seq, v in r["perplexity"].items():
            rows.append([n, "perplexity", int(seq), v["perplexity"]])
        for task, by_len in r["probes"].items():
            for length, v in by_len.items():
                rows.append([n, f"{task}/exact_match", int(length), v["exact_match"]])
                rows.append([n, f"{task}/answer_logprob", int(length), v["answer_logprob"]])
    log_wandb_table(run, "eval", ["model", "metric", "length", "value"], rows,
                    summary={f"{row[0]}/{row[1]}@{row[2]}": row[3] for row in rows})

