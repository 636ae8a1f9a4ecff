"""`salatrain <command> [key=value ...] [--cfg job] [-m]`: compose the command's config, validate, run.

Commands register in ``COMMANDS`` with the module that defines them; each module exposes ``SCHEMA`` (its
config dataclass), ``run(cfg)`` and optionally ``config_name(overrides)`` (to pick a recipe), ``GROUPS``
(Hydra config groups it accepts), ``CONFIG_MODULE`` (package of its primary configs, default
``salatrain.conf``), ``SEARCHPATH`` (more packages for its config groups), ``check(cfg)`` (what can be checked
before any run starts: every job of a ``-m`` sweep is composed and checked before the first one runs) and
``ignored_keys(cfg)`` (keys the chosen mode does not use: setting one is an error).

Exit status: 0 done; 2 a one-line error on stderr (a mistake in the input, a corrupt file, an I/O failure, a
run that diverged); 130 interrupted (Ctrl-C), with nothing committed after the interrupt. ``--verbose`` shows
the libraries' logs and progress bars, and the traceback behind an error.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import interrupt
from .errors import UserError


@dataclass(frozen=True)
class Command:
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "convert": Command("salatrain.convert.command", "dense HF checkpoint + layer plan -> hybrid checkpoint"),
    "select": Command("salatrain.select.command", "choose which layers stay attention (layer_plan.json)"),
    "train": Command("salatrain.train.command", "run a training stage recipe (align, distill, lm) on DeepSpeed"),
    "export": Command("salatrain.train.export", "training checkpoint -> HF checkpoint (consolidates ZeRO-3)"),
    "eval": Command("salatrain.eval.command", "perplexity and synthetic long-context probes"),
    "bench": Command("salatrain.eval.bench_command", "prefill / decode speed and peak memory against prompt length"),
    "pipeline": Command("salatrain.pipeline", "run a pipeline recipe (align -> select -> convert -> train ...)"),
    "quickstart": Command("salatrain.pipeline", "the small offline pipeline on SmolLM2-135M (CPU, minutes)"),
}

USAGE = """usage: salatrain <command> [key=value ...] [--cfg job] [-m]

commands:
{commands}

  key=value     Hydra override of any config key (e.g. plan.ratio=0.25, trainer.max_steps=100)
  --cfg job     print the resolved config and exit
  -m            multirun: comma-separated values sweep (each run gets output_dir/<n>; all checked first)
  -v, --verbose libraries' logs and progress bars, tracebacks behind errors
  -h, --help    this help, or a command's config with `salatrain <command> --help`
"""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name.ljust(width)}  {c.summary}" for name, c in COMMANDS.items())
    return USAGE.format(commands=lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        from .config.compose import closest

        hint = closest(name, list(COMMANDS))
        return _fail(f"unknown command {name!r}" + (f"; did you mean {hint!r}?" if hint else "") + " (see --help)")
    _setup_logging(verbose)
    with interrupt.handling(), warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
        try:
            _run(name, args)
        except UserError as e:
            return _fail(f"{name}: {e}", verbose)
        except KeyboardInterrupt:
            return _interrupted(name)
        except Exception as e:
            problem = io_problem(e)
            if problem is None:
                raise
            return _fail(f"{name}: {problem}", verbose)
        if interrupt.seen():
            return _interrupted(name)
    return 0


def _interrupted(name: str) -> int:
    print(f"salatrain {name}: interrupted; nothing was committed after the interrupt (complete outputs and "
          "checkpoints written before it are intact)", file=sys.stderr)
    return interrupt.EXIT_STATUS


def _run(name: str, args: list[str]) -> None:
    """Compose every job (one, or one per combination of a -m sweep), check them all, then run them."""
    from .config.compose import check_overrides_used, to_object, to_yaml
    from .config.store import register_schema

    show_cfg, multirun, overrides = _parse_flags(args)
    mod = importlib.import_module(COMMANDS[name].module)
    schema_name = getattr(mod, "SCHEMA_NAME", name)
    register_schema(schema_name, mod.SCHEMA)
    if hasattr(mod, "prepare_overrides"):
        overrides = mod.prepare_overrides(name, overrides)
    config_name = mod.config_name(overrides) if hasattr(mod, "config_name") else schema_name
    overrides = [o for o in overrides if not o.startswith("recipe=")]
    groups = tuple(getattr(mod, "GROUPS", ()))
    jobs = _sweep_jobs(mod, config_name, overrides, groups) if multirun else [overrides]
    typed = []
    for n, job in enumerate(jobs):
        try:
            cfg = _compose(mod, config_name, job, groups)
            if show_cfg:
                print(to_yaml(cfg), end="")
                continue
            obj = to_object(cfg)
            check_overrides_used(mod, obj, job)
            if hasattr(mod, "check"):
                mod.check(obj)
        except UserError as e:
            raise UserError(f"[multirun {n + 1}/{len(jobs)}] {' '.join(job)}: {e}" if multirun else str(e)) from None
        typed.append((job, obj))
    for n, (job, obj) in enumerate(typed):
        if multirun:
            print(f"[multirun {n + 1}/{len(jobs)}] {' '.join(job)}", file=sys.stderr)
        mod.run(obj)


def _parse_flags(args: list[str]) -> tuple[bool, bool, list[str]]:
    show_cfg, multirun, overrides = False, False, []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            show_cfg = True
        elif a == "--cfg":
            if i + 1 >= len(args) or args[i + 1] not in ("job", "all"):
                raise UserError("--cfg takes `job` (print the resolved config)")
            show_cfg = True
            i += 1
        elif a in ("-m", "--multirun"):
            multirun = True
        elif a.startswith("-"):
            raise UserError(f"unknown flag {a!r}; overrides are key=value (see --help)")
        elif "=" not in a:
            raise UserError(f"cannot parse {a!r}; overrides are key=value (e.g. output_dir=out)")
        else:
            overrides.append(a)
        i += 1
    return show_cfg, multirun, overrides


def _sweep_jobs(mod, config_name, overrides, groups) -> list[list[str]]:
    """Comma-separated sweeps (Hydra's override grammar) as one override list per combination; each run goes
    to ``<output_dir>/<n>``."""
    from .config.compose import expand_sweeps

    jobs = expand_sweeps(overrides)
    base_out = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    if base_out is None and jobs:  # a recipe's own output_dir: runs go to <it>/<n> as well
        base_out = _compose(mod, config_name, list(jobs[0]), groups).get("output_dir")
    out = []
    for n, job in enumerate(jobs):
        job = list(job)
        if base_out is not None:
            job = [o for o in job if not o.startswith("output_dir=")] + [f"output_dir={Path(base_out) / str(n)}"]
        out.append(job)
    return out


def _compose(mod, config_name, overrides, groups):
    """Compose in the module's ``CONFIG_MODULE`` (default ``salatrain.conf``) plus its ``SEARCHPATH``."""
    from .config.compose import CONFIG_MODULE, compose_config

    module = getattr(mod, "CONFIG_MODULE", CONFIG_MODULE)
    return compose_config(config_name, overrides, groups, module, tuple(getattr(mod, "SEARCHPATH", ())))


def _fail(message: str, verbose: bool = False) -> int:
    if verbose:
        traceback.print_exc()
    print(f"salatrain {message}", file=sys.stderr)
    return 2


IO_HINTS = {
    errno.ENOSPC: "free some space or choose another output_dir",
    errno.EDQUOT: "free some space or choose another output_dir",
    errno.EFBIG: "the file grew past a size limit; free space, raise the limit or choose another output_dir",
    errno.EROFS: "choose an output_dir on a writable file system",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EIO: "check the disk (is it full?) or choose another output_dir",
}
_IO_PHRASES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "File too large": errno.EFBIG, "Read-only file system": errno.EROFS,
               "Permission denied": errno.EACCES, "Input/output error": errno.EIO,
               "file write failed": errno.EIO}


def io_problem(e: BaseException) -> str | None:
    """A one-line description of an I/O failure (disk full, read-only, permissions, ...), or None when ``e``
    is not one. Libraries that wrap the OS error (safetensors, torch.save) are recognised by its text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and (e.errno is not None or e.filename):
            where = f": {e.filename}" if e.filename else ""
            hint = IO_HINTS.get(e.errno, "check the path")
            return f"I/O error: {e.strerror or e}{where}; {hint}"
        text = str(e)
        for phrase, code in _IO_PHRASES.items():
            if phrase.lower() in text.lower():
                return f"I/O error: {phrase} ({type(e).__name__}); {IO_HINTS[code]}"
        e = e.__cause__ or e.__context__
    return None


def _setup_logging(verbose: bool = False) -> None:
    """salatrain's own messages at INFO; libraries' logs and progress bars only with --verbose."""
    level = os.environ.get("SALATRAIN_LOG", "DEBUG" if verbose else "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    libraries = ("datasets", "transformers", "huggingface_hub", "DeepSpeed", "deepspeed", "torch.distributed",
                 "urllib3", "filelock", "fsspec", "httpx", "wandb")
    for lib in libraries:
        logging.getLogger(lib).setLevel(logging.INFO if verbose else logging.CRITICAL)
    if verbose:
        return
    # datasets reads these when it is imported (later, by the commands that load data)
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "critical")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported with salatrain.models: switch its logger and bars off now
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.CRITICAL)
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils import logging as ds_logging

        ds_logging.set_verbosity(logging.CRITICAL)
        ds_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
