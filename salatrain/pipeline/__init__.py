"""`salatrain pipeline recipe=<name> model=<dense dir> output_dir=<dir>`: ordered steps (align → select → convert
→ distill → ...), each reading the folders of the steps before it; `salatrain quickstart` runs the
``quickstart`` recipe. Recipes are recipes/pipeline_<name>.yaml (package ``salatrain.recipes``)."""

from __future__ import annotations

from importlib import resources

from ..errors import UserError
from .config import PipelineConfig, StepSpec
from .runner import run_pipeline

SCHEMA = PipelineConfig
SCHEMA_NAME = "pipeline_schema"
CONFIG_MODULE = "salatrain.recipes"
PREFIX = "pipeline_"

__all__ = ["PipelineConfig", "StepSpec", "pipeline_recipes", "run", "run_pipeline"]


def pipeline_recipes() -> list[str]:
    names = [f.name for f in resources.files("salatrain.recipes").iterdir()]
    return sorted(n[len(PREFIX): -len(".yaml")] for n in names if n.startswith(PREFIX) and n.endswith(".yaml"))


def prepare_overrides(command_name: str, overrides: list[str]) -> list[str]:
    """`salatrain quickstart` is `salatrain pipeline recipe=quickstart`."""
    if command_name != "quickstart":
        return overrides
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")]
    if given and given != ["quickstart"]:
        raise UserError(f"quickstart runs recipe=quickstart; for recipe={given[0]} use `salatrain pipeline`")
    return overrides if given else ["recipe=quickstart", *overrides]


def config_name(overrides: list[str]) -> str:
    from ..config.compose import pick_recipe

    return PREFIX + pick_recipe(overrides, pipeline_recipes(), "pipeline recipe", "pipeline recipes")


def compose_pipeline(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The typed config of a pipeline recipe with Hydra ``overrides``, as the CLI builds it."""
    from ..commands import command_config

    return command_config("pipeline", [f"recipe={recipe}", *(o for o in overrides if not o.startswith("recipe="))])[1]


def run(cfg: PipelineConfig) -> dict:
    return run_pipeline(cfg)
