"""The command registry: every `salatrain <command>`, the module that defines it, and how its config is composed.
The CLI (salatrain.cli) and pipeline steps (salatrain.pipeline.steps) both compose through :func:`resolve`, so a
step's config is exactly what `salatrain <command> <the same overrides>` would run.

A command module exposes ``SCHEMA`` (its config dataclass) and ``run(cfg)``, and optionally:
    SCHEMA_NAME                 the name its schema is registered under (default: the command's name)
    prepare_overrides(name, o)  rewrites the overrides first (`quickstart` is `pipeline recipe=quickstart`)
    config_name(o)              the primary config to compose, e.g. from ``recipe=`` (default: SCHEMA_NAME)
    CONFIG_MODULE               package of its primary configs (default ``salatrain.conf``)
    SEARCHPATH                  more packages for its config groups
    GROUPS                      Hydra config groups it accepts
    check(cfg)                  what can be checked before any run starts
    ignored_keys(cfg)           keys the chosen mode does not use (setting one is an error)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


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


@dataclass(frozen=True)
class Resolved:
    """A command with its primary config chosen; ``overrides`` are what remains to apply (no ``recipe=``)."""

    name: str
    mod: ModuleType
    config_name: str
    overrides: list[str]

    def compose(self, overrides: list[str] | None = None):
        """The composed (untyped) config with ``overrides`` (default: the command line's)."""
        from .config.compose import CONFIG_MODULE, compose_config

        mod = self.mod
        return compose_config(self.config_name, self.overrides if overrides is None else overrides,
                              tuple(getattr(mod, "GROUPS", ())), getattr(mod, "CONFIG_MODULE", CONFIG_MODULE),
                              tuple(getattr(mod, "SEARCHPATH", ())))

    def typed(self, overrides: list[str] | None = None):
        """The typed config: numbers in range, no override of a key the chosen mode does not use."""
        from .config.compose import check_overrides_used, to_object

        overrides = self.overrides if overrides is None else overrides
        obj = to_object(self.compose(overrides))
        check_overrides_used(self.mod, obj, overrides)
        return obj


def resolve(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Resolved:
    """Import command ``name``, register its schema and pick its primary config from ``overrides``."""
    from .config.store import register_schema

    mod = importlib.import_module(COMMANDS[name].module)
    schema_name = getattr(mod, "SCHEMA_NAME", name)
    register_schema(schema_name, mod.SCHEMA)
    overrides = list(overrides)
    if hasattr(mod, "prepare_overrides"):
        overrides = mod.prepare_overrides(name, overrides)
    config_name = mod.config_name(overrides) if hasattr(mod, "config_name") else schema_name
    return Resolved(name, mod, config_name, [o for o in overrides if not o.startswith("recipe=")])


def command_config(name: str, overrides: list[str] | tuple[str, ...] = ()):
    """(module, typed config) of `salatrain <name> <overrides>`, composed exactly as the CLI does."""
    r = resolve(name, overrides)
    return r.mod, r.typed()
