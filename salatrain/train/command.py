"""`salatrain train recipe=<name> [key=value ...]`: compose a stage recipe and run it.

Recipes are primary configs in ``salatrain.recipes`` (recipes/); their defaults (model, data, trainer, optim,
deepspeed, logging, stage) come from the groups in ``salatrain.conf`` (conf/).
"""

from __future__ import annotations

from importlib import resources

from .config import TrainConfig, ignored_keys

SCHEMA = TrainConfig
__all__ = ["SCHEMA", "check", "compose_train", "ignored_keys", "run", "stage_recipes"]
SCHEMA_NAME = "train_schema"
CONFIG_MODULE = "salatrain.recipes"
SEARCHPATH = ("pkg://salatrain.conf",)
GROUPS = ("model", "data", "trainer", "optim", "deepspeed", "logging", "stage")


def stage_recipes() -> list[str]:
    """Names of the stage recipes (recipes/*.yaml except the pipeline recipes ``pipeline_*``)."""
    files = resources.files("salatrain.recipes").iterdir()
    names = [f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml")]
    return sorted(n for n in names if not n.startswith("pipeline"))


def config_name(overrides: list[str]) -> str:
    from ..config.compose import pick_recipe

    return pick_recipe(overrides, stage_recipes(), "recipe", "stage recipes")


def compose_train(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The typed config of ``recipe`` with Hydra ``overrides`` (``key=value`` strings), as the CLI builds it:
    numbers in range, no override of a key the stage does not use."""
    import sys

    from ..config.compose import check_overrides_used, compose_config, to_object
    from ..config.store import register_schema

    register_schema(SCHEMA_NAME, SCHEMA)
    overrides = [o for o in overrides if not o.startswith("recipe=")]
    name = config_name([f"recipe={recipe}"])
    cfg = to_object(compose_config(name, overrides, GROUPS, CONFIG_MODULE, SEARCHPATH))
    check_overrides_used(sys.modules[__name__], cfg, overrides)
    return cfg


def check(cfg: TrainConfig) -> None:
    """What can be checked before any run of a sweep starts: settings, and output_dir against the inputs."""
    from ..rundir import OutputDir
    from .config import validate
    from .loop import run_inputs

    validate(cfg)
    OutputDir(cfg.output_dir, "train", overwrite=cfg.overwrite, reuse=True).check(run_inputs(cfg))


def run(cfg: TrainConfig):
    """Run the stage described by ``cfg`` (under DeepSpeed) and return its :class:`TrainResult`."""
    from .loop import run_stage

    return run_stage(cfg)
