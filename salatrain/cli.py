"""`salatrain <command> [key=value ...] [--cfg job] [-m]`: compose the command's config, validate, run.

Commands register in ``COMMANDS`` with the module that defines them; each module exposes ``SCHEMA`` (its
config dataclass), ``run(cfg)`` and optionally ``config_name(overrides)`` (to pick a recipe), ``GROUPS``
(Hydra config groups it accepts), ``CONFIG_MODULE`` (package of its primary configs, default
``salatrain.conf``) and ``SEARCHPATH`` (more packages for its config groups). Errors in user input print one
line on stderr and exit with status 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

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
  -m            multirun: comma-separated values sweep (each run gets output_dir/<n>)
  -h, --help    this help, or a command's config with `salatrain <command> --help`
"""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name.ljust(width)}  {c.summary}" for name, c in COMMANDS.items())
    return USAGE.format(commands=lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        from .config.compose import closest

        hint = closest(name, list(COMMANDS))
        return _fail(f"unknown command {name!r}" + (f"; did you mean {hint!r}?" if hint else "") + " (see --help)")
    _setup_logging()
    try:
        return _run(name, args)
    except UserError as e:
        return _fail(f"{name}: {e}")
    except KeyboardInterrupt:
        print(f"salatrain {name}: interrupted", file=sys.stderr)
        return 130


def _run(name: str, args: list[str]) -> int:
    from .config.compose import to_object, to_yaml
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
    if multirun:
        return _multirun(mod, config_name, overrides, groups, show_cfg)
    cfg = _compose(mod, config_name, overrides, groups)
    if show_cfg:
        print(to_yaml(cfg), end="")
        return 0
    mod.run(to_object(cfg))
    return 0


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


def _multirun(mod, config_name, overrides, groups, show_cfg) -> int:
    """Expand comma-separated sweeps (Hydra's override grammar) into one run per combination."""
    from .config.compose import expand_sweeps, to_object, to_yaml

    jobs = expand_sweeps(overrides)
    base_out = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    if base_out is None and jobs:  # a recipe's own output_dir: runs go to <it>/<n> as well
        base_out = _compose(mod, config_name, list(jobs[0]), groups).get("output_dir")
    for n, job in enumerate(jobs):
        job = list(job)
        if base_out is not None:
            job = [o for o in job if not o.startswith("output_dir=")] + [f"output_dir={Path(base_out) / str(n)}"]
        cfg = _compose(mod, config_name, job, groups)
        print(f"[multirun {n + 1}/{len(jobs)}] {' '.join(job)}", file=sys.stderr)
        if show_cfg:
            print(to_yaml(cfg), end="")
            continue
        mod.run(to_object(cfg))
    return 0


def _compose(mod, config_name, overrides, groups):
    """Compose in the module's ``CONFIG_MODULE`` (default ``salatrain.conf``) plus its ``SEARCHPATH``."""
    from .config.compose import CONFIG_MODULE, compose_config

    module = getattr(mod, "CONFIG_MODULE", CONFIG_MODULE)
    return compose_config(config_name, overrides, groups, module, tuple(getattr(mod, "SEARCHPATH", ())))


def _fail(message: str) -> int:
    print(f"salatrain {message}", file=sys.stderr)
    return 2


def _setup_logging() -> None:
    level = os.environ.get("SALATRAIN_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "datasets", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
