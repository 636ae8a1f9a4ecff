"""Registers the command schemas with Hydra's ConfigStore (``salatrain.conf`` holds YAML groups/recipes)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from .schema import ConvertConfig

SCHEMAS: dict[str, type] = {"convert": ConvertConfig}
_done = False


def register_schema(name: str, schema: type) -> None:
    """Commands add their schema here (at import time); the CLI composes ``name`` with overrides."""
    SCHEMAS[name] = schema
    if _done:
        ConfigStore.instance().store(name=name, node=schema)


def register() -> None:
    global _done
    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(name=name, node=schema)
    _done = True
