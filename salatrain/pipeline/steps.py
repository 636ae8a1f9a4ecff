"""The step kinds of a pipeline: each turns its spec and the artifacts of earlier steps into one salatrain
command (the same keys as on the command line) and knows which artifacts its folder then holds.

    kind      reads                                   command                           leaves in its folder
    corpus    -                                       (built in: stdlib docs/sources)   data, heldout
    train     base; hybrid (unless align); data       salatrain train recipe=<recipe>   aligned (align) or hybrid
    select    base, aligned; heldout                  salatrain select                  plan
    convert   base; plan, aligned (when present)      salatrain convert                 hybrid
    eval      hybrid (or base), base as teacher       salatrain eval                    eval
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..commands import command_config
from ..errors import UserError
from ..eval.report import is_number
from .config import StepSpec

log = logging.getLogger(__name__)
_SAFE = re.compile(r"^[A-Za-z0-9_./:@+\-]+$")
_WORDS = {"true", "false", "null", "none", "nan", "inf", "-inf"}


@dataclass
class Prepared:
    """A step ready to run: its command line (shown, hashed) and what its folder will hold."""

    command: list[str]  # e.g. ["train", "recipe=halo_align", "model.path=...", ...]
    outputs: dict[str, Any]  # artifact name -> path (or list of paths)
    check: Callable[[], None]  # composes and validates the config without running
    run: Callable[[], None]


def format_value(v: Any) -> str:
    """A Python value as a Hydra override value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{format_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _SAFE.match(s) and s.lower() not in _WORDS and not is_number(s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def flatten(args: dict, prefix: str = "") -> dict[str, Any]:
    """{"trainer": {"seq_len": 512}} -> {"trainer.seq_len": 512} (lists and scalars are leaves)."""
    out = {}
    for k, v in args.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={format_value(v)}" for k, v in values.items()]


def _given(args: dict[str, Any], key: str) -> bool:
    return any(k == key or k.startswith(key + ".") for k in args)


def prepare(kind: str, name: str, spec: StepSpec, step_dir: Path, ctx: dict) -> Prepared:
    """ctx: {"base": dense dir, "artifacts": {name: path}, "wandb": {mode, project, ...}, "pipeline": name}."""
    fn = {"corpus": _corpus, "train": _train, "select": _select, "convert": _convert, "eval": _eval}.get(kind)
    if fn is None:
        raise UserError(f"step {name}: unknown kind {kind!r}; choose from corpus, train, select, convert, eval")
    if kind != "train" and (spec.recipe is not None or spec.tokens is not None):
        raise UserError(f"step {name}: recipe and tokens apply to train steps only")
    return fn(name, spec, step_dir, ctx)


def _need(ctx: dict, artifact: str, step: str, producer: str) -> Any:
    if artifact in ctx["artifacts"]:
        return ctx["artifacts"][artifact]
    if artifact == "data":
        raise UserError(f"step {step} needs training data: pass data=[<jsonl/parquet/text files or hub datasets>] "
                        "or add a corpus step")
    raise UserError(f"step {step} needs {artifact!r}, which no earlier step produces (add a {producer} step)")


# ---------------------------------------------------------------------------------------------------- corpus

CORPUS_DEFAULTS = {"sources": ["pydoc", "stdlib"], "max_train_bytes": 2_000_000, "max_heldout_bytes": 100_000,
                   "heldout_every": 20}


def _corpus(name, spec, step_dir, ctx) -> Prepared:
    args = {**CORPUS_DEFAULTS, **spec.args}
    unknown = sorted(set(args) - set(CORPUS_DEFAULTS))
    if unknown:
        raise UserError(f"step {name} (corpus): unknown argument(s) {unknown}; known: {sorted(CORPUS_DEFAULTS)}")
    outputs = {"data": [str(step_dir / "train.jsonl")], "heldout": [str(step_dir / "heldout.jsonl")]}
    command = ["corpus", *overrides(args), f"output_dir={format_value(str(step_dir))}"]

    def check():
        from ..eval.text import BUILTIN, is_corpus_file

        bad = [s for s in args["sources"] if s not in BUILTIN and not is_corpus_file(str(s))]
        if bad:
            raise UserError(f"step {name} (corpus): unknown source(s) {bad}; choose from {list(BUILTIN)} or "
                            "existing .jsonl(.gz) files")

    return Prepared(command, outputs, check, lambda: write_corpus(step_dir, **args))


def write_corpus(out: Path, sources: list[str], max_train_bytes: int, max_heldout_bytes: int,
                 heldout_every: int) -> dict:
    """train.jsonl / heldout.jsonl ({"text": ...} per document) from built-in corpora, split by document id;
    sources are interleaved document by document so a byte budget samples all of them. A source listed twice
    is repeated in train.jsonl (a weight); held-out documents are written once."""
    from ..eval.text import builtin_documents, is_heldout

    out.mkdir(parents=True, exist_ok=True)
    iters = [builtin_documents(s) for s in sources]
    sizes = {"train": 0, "heldout": 0}
    docs = {"train": 0, "heldout": 0}
    limits = {"train": max_train_bytes, "heldout": max_heldout_bytes}
    seen: set[str] = set()
    with open(out / "train.jsonl", "w") as tr, open(out / "heldout.jsonl", "w") as ho:
        files = {"train": tr, "heldout": ho}
        while iters and any(sizes[k] < limits[k] for k in sizes):
            for it in list(iters):
                item = next(it, None)
                if item is None:
                    iters.remove(it)
                    continue
                doc_id, text = item
                split = "heldout" if is_heldout(doc_id, heldout_every) else "train"
                if sizes[split] >= limits[split] or not text.strip() or (split == "heldout" and doc_id in seen):
                    continue
                if split == "heldout":
                    seen.add(doc_id)
                files[split].write(json.dumps({"text": text, "id": doc_id}) + "\n")
                sizes[split] += len(text.encode())
                docs[split] += 1
    stats = {"sources": sources, "bytes": sizes, "documents": docs, "heldout_every": heldout_every}
    (out / "corpus.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("corpus: %d train documents (%.1f MB), %d held-out (%.2f MB)", docs["train"], sizes["train"] / 1e6,
             docs["heldout"], sizes["heldout"] / 1e6)
    return stats


# ---------------------------------------------------------------------------------------------------- train


def _train(name, spec, step_dir, ctx) -> Prepared:
    from ..train.command import compose_train, run as run_train

    if not spec.recipe:
        raise UserError(f"step {name} (train) needs recipe=<stage recipe>")
    args = flatten(spec.args)
    try:
        stage_cfg = compose_train(spec.recipe, overrides(args))
    except UserError as e:
        raise UserError(f"step {name} (train recipe={spec.recipe}): {e}") from None
    values: dict[str, Any] = {}
    align = stage_cfg.stage.loss == "mse_align"
    if not _given(args, "model.path"):
        values["model.path"] = ctx["base"] if align else _need(ctx, "hybrid", name, "convert")
    if (stage_cfg.stage.teacher or stage_cfg.stage.loss == "kl") and not _given(args, "teacher.path"):
        values["teacher.path"] = ctx["base"]
    if not _given(args, "data.files"):
        values["data.files"] = _need(ctx, "data", name, "corpus")
    if spec.tokens is not None and not _given(args, "trainer.max_steps"):
        values["trainer.max_steps"] = max(1, math.ceil(spec.tokens / stage_cfg.trainer.global_batch_tokens))
    values.update(_wandb_values(ctx, args))
    values["output_dir"] = str(step_dir)
    ovr = overrides(args) + overrides(values)
    command = ["train", f"recipe={spec.recipe}", *ovr]

    def check():
        from ..train.config import validate

        try:
            validate(compose_train(spec.recipe, ovr))
        except UserError as e:
            raise UserError(f"step {name} (train recipe={spec.recipe}): {e}") from None

    def run():
        result = run_train(compose_train(spec.recipe, ovr))
        log.info("step %s: %d steps, final loss %s", name, result.steps, result.final_loss)

    return Prepared(command, {"aligned" if align else "hybrid": str(step_dir)}, check, run)


# ---------------------------------------------------------------------------------------------------- commands


def _command_step(command: str, name: str, args: dict, values: dict, outputs: dict, validate=None) -> Prepared:
    ovr = overrides(args) + overrides(values)

    def check():
        try:
            _, cfg = command_config(command, ovr)
        except UserError as e:
            raise UserError(f"step {name} ({command}): {e}") from None
        if validate is not None:
            try:
                validate(cfg)
            except UserError as e:
                raise UserError(f"step {name} ({command}): {e}") from None

    def run():
        mod, cfg = command_config(command, ovr)
        mod.run(cfg)

    return Prepared([command, *ovr], outputs, check, run)


def _select(name, spec, step_dir, ctx) -> Prepared:
    args = flatten(spec.args)
    values: dict[str, Any] = {"output_dir": str(step_dir), "overwrite": True}
    method = args.get("method", "halo")
    if not _given(args, "metrics"):
        values["model"] = ctx["base"]
        if method in ("halo", "stepwise", "retrieval") and not _given(args, "aligned"):
            values["aligned"] = _need(ctx, "aligned", name, "align (train recipe=halo_align)")
    sweeps = "aligned" in values or _given(args, "aligned")
    if not sweeps:  # the recipe's sweep settings: a method that measures nothing has no sweep to set
        args = {k: v for k, v in args.items() if not (k == "sweep" or k.startswith("sweep."))}
    elif "heldout" in ctx["artifacts"] and not _given(args, "sweep.text.files"):
        values["sweep.text.files"] = ctx["artifacts"]["heldout"]
    values.update(_wandb_values(ctx, args))

    def validate(cfg):
        from ..hf_checkpoint import CheckpointDir
        from ..select.config import check_settings, mode_of

        mode_of(cfg)
        if cfg.model:
            check_settings(cfg, int(CheckpointDir(cfg.model).config.get("num_hidden_layers", 0)))

    return _command_step("select", name, args, values, {"plan": str(step_dir / "layer_plan.json")}, validate)


def _convert(name, spec, step_dir, ctx) -> Prepared:
    args = flatten(spec.args)
    values: dict[str, Any] = {"model": ctx["base"], "output_dir": str(step_dir), "overwrite": True}
    if not _given(args, "plan"):
        values["plan.file"] = _need(ctx, "plan", name, "select")
    if "aligned" in ctx["artifacts"] and not _given(args, "aligned"):
        values["aligned"] = ctx["artifacts"]["aligned"]
    return _command_step("convert", name, args, values, {"hybrid": str(step_dir)})


def _eval(name, spec, step_dir, ctx) -> Prepared:
    args = flatten(spec.args)
    hybrid = ctx["artifacts"].get("hybrid")
    values: dict[str, Any] = {"output_dir": str(step_dir), "overwrite": True}
    if not _given(args, "model"):
        values["model"] = hybrid or ctx["base"]
    if hybrid and not _given(args, "compare") and not _given(args, "model"):
        values["compare"] = [ctx["base"]]
        values["names"] = ["hybrid", "teacher"]
    if "heldout" in ctx["artifacts"] and not _given(args, "perplexity.files"):
        values["perplexity.files"] = ctx["artifacts"]["heldout"]
    values.update(_wandb_values(ctx, args))

    def validate(cfg):
        from ..eval.evaluate import check_settings

        check_settings(cfg)

    return _command_step("eval", name, args, values, {"eval": str(step_dir / "eval.json")}, validate)


def _wandb_values(ctx: dict, args: dict) -> dict:
    keys = ("mode", "project", "entity", "group")
    return {f"logging.wandb.{k}": ctx["wandb"][k] for k in keys
            if ctx["wandb"].get(k) is not None and not _given(args, f"logging.wandb.{k}")}
