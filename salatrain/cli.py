"""`salatrain <command> [key=value ...] [--cfg job] [-m]`: compose the command's config, validate, run.

Commands and the protocol of the modules that define them are in salatrain.commands (shared with pipeline
steps). Every job of a ``-m`` sweep is composed and checked (``check(cfg)``) before the first one runs.

Exit status: 0 done; 2 a one-line error on stderr (a mistake in the input, a corrupt file, an I/O failure, a
run that diverged); 130 interrupted (Ctrl-C), with nothing committed after the interrupt. ``--verbose`` shows
the libraries' logs and progress bars, and the traceback behind an error.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import interrupt
from .commands import COMMANDS
from .errors import UserError


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
    if argv and argv[0] in ("-m", "--multirun") and len(argv) > 1:  # `salatrain -m convert ...` as `convert -m`
        argv = [argv[1], argv[0], *argv[2:]]
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
        except KeyboardInterrupt:
            return _interrupted(name)
        except Exception as e:
            if interrupt.seen():  # the interrupt surfaced as another error (e.g. torch's mode stack, cut mid-push)
                return _interrupted(name)
            if isinstance(e, UserError):
                return _fail(f"{name}: {e}", verbose)
            problem = io_problem(e)
            if problem is None:
                raise
            return _fail(f"{name}: {problem}", verbose)
        if interrupt.seen():
            return _interrupted(name)
    return 0


def _interrupted(name: str) -> int:
    done = interrupt.commits()
    print(f"salatrain {name}: interrupted; nothing was committed after the interrupt (complete outputs and "
          "checkpoints written before it are intact" + (f"; written complete: {', '.join(done)}" if done else "")
          + ")", file=sys.stderr)
    return interrupt.EXIT_STATUS


def _run(name: str, args: list[str]) -> None:
    """Compose every job (one, or one per combination of a -m sweep), check them all, then run them."""
    from .commands import resolve
    from .config.compose import to_yaml

    show_cfg, multirun, overrides = _parse_flags(args)
    try:
        command = resolve(name, overrides)
    except UserError as e:
        if not (str(e).startswith("missing recipe=") and any(a in ("-h", "--help") for a in args)):
            raise
        listing = str(e).split("; ", 1)[1]  # "<kind> recipes: a, b, ..."
        print(f"usage: salatrain {name} recipe=<name> [key=value ...]\n\n{listing}\n\n"
              f"`salatrain {name} recipe=<name> --help` prints that recipe's config")
        return
    mod = command.mod
    jobs = _sweep_jobs(command) if multirun else [command.overrides]
    typed = []
    for n, job in enumerate(jobs):
        try:
            if show_cfg:
                print(to_yaml(command.compose(job)), end="")
                continue
            obj = command.typed(job)
            if hasattr(mod, "check"):
                mod.check(obj)
        except UserError as e:
            raise UserError(f"[multirun {n + 1}/{len(jobs)}] {' '.join(job)}: {e}" if multirun else str(e)) from None
        typed.append((job, obj))
    if multirun and typed:
        _check_sweep_outputs(typed)
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


def _sweep_jobs(command) -> list[list[str]]:
    """Comma-separated sweeps (Hydra's override grammar) as one override list per combination; each run goes
    to ``<output_dir>/<n>``."""
    from .config.compose import expand_sweeps

    overrides = command.overrides
    jobs = expand_sweeps(overrides)
    base_out = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    if base_out is None and jobs:  # a recipe's own output_dir: runs go to <it>/<n> as well
        base_out = command.compose(list(jobs[0])).get("output_dir")
    out = []
    for n, job in enumerate(jobs):
        job = list(job)
        if base_out is not None:
            job = [o for o in job if not o.startswith("output_dir=")] + [f"output_dir={Path(base_out) / str(n)}"]
        out.append(job)
    return out


def _check_sweep_outputs(typed: list) -> None:
    """Each job of a sweep checks its own output_dir against its own inputs; this checks it against every job's
    inputs, so that no job writes where another reads (e.g. model=<dir>,<output_dir>/0)."""
    from .rundir import check_not_input

    inputs = {}
    for n, (job, obj) in enumerate(typed):
        for key, value in _path_values(obj):
            inputs[f"{key} (multirun job {n + 1})"] = value
    for n, (job, obj) in enumerate(typed):
        out = getattr(obj, "output_dir", None)
        if out:
            try:
                check_not_input(out, inputs)
            except UserError as e:
                raise UserError(f"[multirun {n + 1}/{len(typed)}] {e}") from None


def _path_values(obj, prefix: str = ""):
    """(key, value) for every string in a typed config that names an existing file or folder, but output and
    cache locations (which a run writes)."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return
    for k, v in items:
        key = f"{prefix}{k}"
        if str(k).endswith(("output_dir", "cache_dir")):
            continue
        if isinstance(v, str):
            if v and not v.startswith("builtin:") and os.path.exists(os.path.expanduser(v)):
                yield key, v
        else:
            yield from _path_values(v, key + ".")


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
