"""Family adapters, one file per family. ``family_for(model_type)`` picks one or names the supported ones."""

from __future__ import annotations

from . import llama, minicpm, minicpm_sala, mistral, qwen2, qwen3
from .base import Family

FAMILIES: dict[str, Family] = {
    mt: mod.FAMILY for mod in (llama, mistral, qwen2, qwen3, minicpm, minicpm_sala) for mt in mod.FAMILY.model_types
}


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unsupported model_type {model_type!r}; salatrain supports: {supported}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "family_for"]
